"""The public API: `palm.<name>` is the same object before and after every name has been used."""

import pkgutil
import subprocess
import sys

import palm

USE_EVERY_NAME = r"""
import tempfile, types
import torch
import palm

def snapshot():
    return {name: getattr(palm, name) for name in palm.__all__}

first = snapshot()
config = palm.get_config("tiny").replace(num_tokens=300, dim=32, depth=1, heads=2, dim_head=16)
model = palm.PaLM(palm.PaLMConfig(**config.to_dict()))
prompt = torch.tensor([1, 2, 3])
palm.generate(model, prompt, 4)
list(palm.stream(model, prompt, 4))
palm.quantize(model, "int8")
palm.generate(model, prompt, 4)
with tempfile.TemporaryDirectory() as directory:
    palm.save_pretrained(palm.PaLM(config), directory)
    palm.load(directory)
palm.load_tokenizer("bytes").encode("x")
try:
    palm.load("no/such/dir/")
except palm.PalmError:
    pass
# the README's own sequence, and every name once more
palm.generate(model, prompt, 4)
palm.quantize(palm.PaLM(config), "int8")
second = snapshot()
assert all(second[name] is first[name] for name in first), [n for n in first if second[n] is not first[n]]
assert not any(isinstance(value, types.ModuleType) for value in second.values())
print("ok")
"""


def test_public_names_stay_what_they_are_after_use():
    # a fresh interpreter: the names are resolved lazily on first use there, as for a user
    done = subprocess.run([sys.executable, "-c", USE_EVERY_NAME], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_no_submodule_shares_a_name_with_the_public_api():
    # importing palm.<x> sets the package attribute `x` to the module, hiding a function named x
    submodules = {m.name for m in pkgutil.iter_modules(palm.__path__)}
    assert submodules and not submodules & set(palm.__all__)
