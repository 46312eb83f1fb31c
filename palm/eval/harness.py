"""palm as an lm-evaluation-harness model: `lm_eval`'s tasks run on any palm model.

Importing this module registers the model under the name `palm` (model_args: `pretrained`
(anything `palm.load` takes), `tokenizer`, `dtype`, `device`, `max_length`, `max_gen_toks`).
lm-eval finds models only by registration in its own process, so its command line is reached
through `python -m palm.eval --model palm --model_args pretrained=runs/x/model ...`, which
takes every flag `lm_eval` takes; `palm eval --tasks ...` is the short way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from palm.checks import check_device, check_vocabulary
from palm.errors import PalmError

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context ids, continuation ids)


@register_model("palm")
class PalmLM(TemplateLM):
    """A palm model and tokenizer behind the harness's three request types.

    `loglikelihood`: requests sorted longest first and batched; requests that share context +
    continuation[:-1] (the choices of a one-token-answer question) are served by one forward pass.
    `loglikelihood_rolling`: the harness's disjoint rolling windows of `max_length`, batched.
    `generate_until`: KV-cache decoding of a batch (palm.inference.decoding.stream), stopped as soon
    as every sequence has produced one of its stop sequences or EOS.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer=None,
        *,
        model: nn.Module | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **kwargs,
    ):
        super().__init__()
        from palm.checkpoint import load
        from palm.tokenizer import Tokenizer, load_tokenizer

        if model is None:
            if pretrained is None:
                raise PalmError("the palm harness model needs pretrained=<anything palm.load takes>")
            device = check_device(device)
            model = load(pretrained, device=device, dtype=dtype)
        self.model = model.eval()
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer or "bytes")
        self.palm_tokenizer: Tokenizer = tokenizer
        check_vocabulary(tokenizer, model.config.num_tokens)
        if tokenizer.eos_id is None:
            raise PalmError(f"tokenizer {tokenizer.name} has no end-of-text token, which the harness needs")
        self._device = model.token_emb.weight.device
        if str(batch_size).startswith("auto"):
            batch_size = 8  # no search for the largest batch that fits: a fixed default
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.palm_tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.palm_tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.palm_tokenizer.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.palm_tokenizer.decode(ids)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        collator = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts",
            group_fn=lambda r: r[1] + r[2][:-1],
        )
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood requests")
        for chunk in collator.get_batched(n=self.batch_size):
            # one sequence per request: context + continuation, the last max_length + 1 tokens of it
            sequences = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in chunk]
            width = max(len(s) for s in sequences) - 1
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(sequences):
                inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
            logits = self.model(inputs.to(self._device))
            for (strings, context, continuation), sequence, row in zip(chunk, sequences, logits):
                inputs_len = len(sequence) - 1
                logprobs = F.log_softmax(row[inputs_len - len(continuation) : inputs_len].float(), dim=-1)[None]
                for strings_i, continuation_i, logprobs_i in collator.get_cache(
                    req_str=strings, cxt_toks=context, cont_toks=continuation, logits=logprobs
                ):
                    # a shorter continuation of the same group reads the tail of the longest's logits
                    logprobs_i = logprobs_i[:, -len(continuation_i):]
                    targets = torch.tensor(continuation_i, device=logprobs_i.device)[None, :, None]
                    greedy = bool((logprobs_i.argmax(-1) == targets[..., 0]).all())
                    answer = (float(logprobs_i.gather(-1, targets).sum()), greedy)
                    results.append(answer)
                    if strings_i is not None:
                        self.cache_hook.add_partial("loglikelihood", strings_i, answer)
                    progress.update(1)
        progress.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from palm.inference.decoding import stream

        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos_text = self.tok_decode([self.eot_token_id])
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise PalmError(f"max_gen_toks {max_new} leaves no room for a prompt in a context of {self.max_length}")
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            prompts = [(self.tok_encode(c) or [self.eot_token_id])[-(self.max_length - max_new):] for c in contexts]
            new = [[] for _ in prompts]
            done = [False] * len(prompts)
            for tokens in stream(self.model, prompts, max_new, temperature=temperature, filter_thres=None,
                                 top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), eos_token_id=self.eot_token_id):
                for i, token in enumerate(tokens.tolist()):
                    if done[i]:
                        continue
                    if token == self.eot_token_id:
                        done[i] = True
                        continue
                    new[i].append(token)
                    text = self.tok_decode(new[i])
                    done[i] = any(stop and stop in text for stop in until)
                if all(done):
                    break
            for context, ids in zip(contexts, new):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

