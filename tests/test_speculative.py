import copy

import pytest
import torch

import palm
from palm import PaLM, PaLMConfig, PalmError
from palm.inference.sampling import sampling_probs
from palm.inference.speculative import forward_from, speculative_stream, verify

from conftest import CORPUS


def noisy_copy(model: PaLM, noise: float, seed: int = 0) -> PaLM:
    """A copy of `model` with Gaussian noise on its weights: a draft that agrees with it often, not always."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return draft


def prompts():
    text = CORPUS.encode()
    return [torch.tensor(list(text[a:b])) for a, b in ((0, 1), (5, 30), (200, 260), (1000, 1003))]


@pytest.mark.parametrize("draft_k", [1, 5])
def test_greedy_speculative_equals_greedy(trained_tiny, draft_k):
    draft = noisy_copy(trained_tiny, 0.5)
    for prompt in prompts():
        plain = palm.generate(trained_tiny, prompt, 30, temperature=0)
        spec = speculative_stream(trained_tiny, draft, prompt, 30, draft_k=draft_k, temperature=0)
        tokens = torch.cat(list(spec))
        assert torch.equal(torch.cat([prompt, tokens]), plain)
        assert 0 < spec.acceptance.accepted < spec.acceptance.proposed  # both accept and reject paths ran


def test_compiled_speculative_greedy_equals_eager_greedy(trained_tiny):
    # The compiled path attends over the whole preallocated cache with a mask, the eager one over
    # the filled part: the tokens must still be the target's greedy ones, in and past every round.
    from torch._dynamo.utils import counters

    draft = noisy_copy(trained_tiny, 0.5)
    torch._dynamo.reset()
    new_graphs = []
    for prompt in (prompts()[1], prompts()[1].flip(0)):  # two prompts of one length
        plain = palm.generate(trained_tiny, prompt, 30, temperature=0)
        before = counters["stats"]["unique_graphs"]  # (a count over the whole process)
        spec = speculative_stream(trained_tiny, draft, prompt, 30, draft_k=4, temperature=0, compile=True)
        assert torch.equal(torch.cat([prompt, *list(spec)]), plain)
        assert 0 < spec.acceptance.accepted < spec.acceptance.proposed
        new_graphs.append(counters["stats"]["unique_graphs"] - before)
    # one graph for the draft's step and one for every verifying width; none more for the second prompt
    assert new_graphs == [2, 0]


def test_greedy_with_the_target_as_its_own_draft_accepts_everything(trained_tiny):
    prompt = prompts()[1]
    spec = speculative_stream(trained_tiny, trained_tiny, prompt, 23, draft_k=4, temperature=0)
    tokens = torch.cat(list(spec))
    assert torch.equal(torch.cat([prompt, tokens]), palm.generate(trained_tiny, prompt, 23, temperature=0))
    # 23 tokens = 4 rounds of 4 accepted + 1 bonus, then a last round of 2 proposals + 1
    assert (spec.acceptance.proposed, spec.acceptance.accepted, spec.acceptance.rounds) == (18, 18, 5)


def test_generate_with_a_draft_matches_plain_greedy_on_a_left_padded_batch(trained_tiny):
    draft = noisy_copy(trained_tiny, 0.5, seed=1)
    batch = [p for p in prompts()]
    plain = palm.generate(trained_tiny, batch, 30, temperature=0, eos_token_id=ord("\n"))
    spec = palm.generate(trained_tiny, batch, 30, temperature=0, eos_token_id=ord("\n"), draft_model=draft, draft_k=3)
    assert torch.equal(spec, plain)


def test_eos_ends_the_stream(trained_tiny):
    prompt = torch.tensor(list(b"Alice has 3 apples and gives 1 to the fox."))
    plain = palm.generate(trained_tiny, prompt, 60, temperature=0, eos_token_id=ord("\n"))
    spec = palm.generate(trained_tiny, prompt, 60, temperature=0, eos_token_id=ord("\n"),
                         draft_model=noisy_copy(trained_tiny, 0.3), draft_k=5)
    assert int(plain[-1]) == ord("\n") and torch.equal(spec, plain)


def test_other_vocabulary_or_bad_options_are_refused(trained_tiny):
    other = PaLM(PaLMConfig(num_tokens=300, dim=32, depth=1, heads=2, dim_head=16))
    with pytest.raises(PalmError, match="the draft model has 300 tokens but the target 257"):
        palm.generate(trained_tiny, torch.tensor([1, 2]), 5, draft_model=other)
    with pytest.raises(PalmError, match="draft_k must be at least 1"):
        palm.generate(trained_tiny, torch.tensor([1, 2]), 5, draft_model=trained_tiny, draft_k=0)
    short = PaLM(trained_tiny.config.replace(max_seq_len=16))
    with pytest.raises(PalmError, match="exceeds the model's context of 16"):
        palm.generate(trained_tiny, torch.tensor([1, 2]), 20, draft_model=short)


def test_cache_rollback_equals_a_fresh_prefill():
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=97, dim=64, depth=2, heads=4, dim_head=16)).eval()
    with torch.no_grad():
        model.token_emb.weight.mul_(30)  # peaked logits, so a wrong key would show
    sequence = torch.randint(0, 97, (1, 40))
    cache = model.make_cache(1, 64)
    with torch.no_grad():
        forward_from(model, cache, sequence[:, :20], 0)
        forward_from(model, cache, torch.randint(0, 97, (1, 6)), 20)  # 6 proposals, all rejected below
        forward_from(model, cache, sequence[:, 20:23], 20)  # ... then 3 others were accepted
        rolled = forward_from(model, cache, sequence[:, 23:40], 23)
        fresh = model(sequence)[:, 23:40]
    torch.testing.assert_close(rolled, fresh, atol=1e-5, rtol=0)


# --- the rejection rule's distribution, on a vocabulary of 8 ---

VOCAB = 8


def two_step_tables(seed: int):
    """Target and draft distributions for two tokens, the second depending on the first:
    p1 (V,), p2 (V, V) rows indexed by the first token; likewise q1, q2."""
    g = torch.Generator().manual_seed(seed)
    def dist(*shape):
        return (2.0 * torch.randn(*shape, VOCAB, generator=g)).softmax(-1)
    return dist(), dist(VOCAB), dist(), dist(VOCAB)


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def test_rejection_rule_follows_the_target_distribution():
    p1, p2, q1, q2 = two_step_tables(seed=0)
    trials = 200_000
    g = torch.Generator().manual_seed(1)
    x1 = torch.multinomial(q1, trials, replacement=True, generator=g)
    x2 = torch.multinomial(q2[x1], 1, generator=g)[:, 0]
    pbonus = torch.full((trials, VOCAB), 1.0 / VOCAB)  # after two accepted tokens (not checked here)
    target = torch.stack([p1.expand(trials, -1), p2[x1], pbonus], dim=1)
    draft = torch.stack([q1.expand(trials, -1), q2[x1]], dim=1)
    accepted, next_token = verify(target, draft, torch.stack([x1, x2], dim=1), greedy=False, generator=g)
    first = torch.where(accepted >= 1, x1, next_token)
    # when the first token was replaced, the second comes from the next round: a draw from p2[first]
    second = torch.where(accepted >= 2, x2, torch.where(accepted == 1, next_token, torch.zeros_like(x2)))
    redraw = torch.multinomial(p2[first], 1, generator=g)[:, 0]
    second = torch.where(accepted == 0, redraw, second)
    joint = torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB).float()
    expected = (p1[:, None] * p2).flatten()
    # sampling noise of the TV distance over 64 cells at 200k trials is ~0.006; always accepting gives
    # the draft's joint, q1 q2, at TV ~0.5 from the target's
    assert total_variation(joint, expected) < 0.015
    assert total_variation(torch.bincount(first, minlength=VOCAB).float(), p1) < 0.01
    assert 0.5 * float((q1[:, None] * q2 - p1[:, None] * p2).abs().sum()) > 0.2  # the test can tell them apart


def test_speculative_sampling_matches_the_target_end_to_end():
    """Two tokens from real models (vocab 8) through `speculative_stream`, against their exact
    distribution under the target, computed by forwards of every first token."""
    torch.manual_seed(1)
    config = PaLMConfig(num_tokens=VOCAB, dim=16, depth=1, heads=2, dim_head=8)
    target, draft = PaLM(config).eval(), PaLM(config).eval()
    with torch.no_grad():
        target.token_emb.weight.mul_(10)  # less flat distributions than random weights give
        draft.token_emb.weight.mul_(10)
    prompt = torch.tensor([3, 1, 4])
    options = dict(temperature=1.0, filter_thres=None, top_p=0.97)
    with torch.no_grad():
        p1 = sampling_probs(target(prompt[None])[0, -1], **options)
        seconds = torch.stack([torch.cat([prompt, torch.tensor([t])]) for t in range(VOCAB)])
        p2 = sampling_probs(target(seconds)[:, -1], **options)
        q1 = sampling_probs(draft(prompt[None])[0, -1], **options)
    expected = (p1[:, None] * p2).flatten()
    g = torch.Generator().manual_seed(0)
    trials = 600
    counts = torch.zeros(VOCAB * VOCAB)
    for _ in range(trials):
        # max_new_tokens 2: one proposal, then the bonus token or, after a rejection, a round of its own
        a, b = torch.cat(list(speculative_stream(target, draft, prompt, 2, draft_k=2, generator=g, **options)))
        counts[a * VOCAB + b] += 1
    # the draft's first token is 0.36 (TV) from the target's, and so is the joint if every
    # proposal were accepted; 600 trials leave a sampling noise of ~0.04 on 8 cells, ~0.1 on 64
    assert 0.5 * float((q1 - p1).abs().sum()) > 0.3
    assert total_variation(counts.view(VOCAB, VOCAB).sum(1), p1) < 0.12
    assert total_variation(counts, expected) < 0.2


def test_cli_generate_with_a_draft_prints_the_greedy_text_and_the_acceptance(trained_tiny, tmp_path, capsys):
    from palm.cli import main

    palm.save_pretrained(trained_tiny, tmp_path / "target")
    palm.save_pretrained(noisy_copy(trained_tiny, 0.5), tmp_path / "draft")
    greedy = ["generate", "Bob has 1", "--checkpoint", str(tmp_path / "target"), "--tokenizer", "bytes",
              "--temperature", "0", "--max_new_tokens", "40"]
    assert main(greedy) == 0
    plain = capsys.readouterr()
    assert main([*greedy, "--draft", str(tmp_path / "draft"), "--draft_k", "3"]) == 0
    drafted = capsys.readouterr()
    assert drafted.out == plain.out
    assert "draft acceptance" in drafted.err and "k=3" in drafted.err
    other = PaLM(PaLMConfig(num_tokens=300, dim=32, depth=1, heads=2, dim_head=16))
    palm.save_pretrained(other, tmp_path / "other")
    assert main([*greedy, "--draft", str(tmp_path / "other")]) == 1
    assert "the draft model has 300 tokens but the target 257" in capsys.readouterr().err
