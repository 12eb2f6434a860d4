"""Other engines on exactly our weights, for side-by-side measurement in bench.py: transformers' generate() (its
Llama model, built from our weights by scripts/hf_format.py).
"""
import time

import torch

import s3d
from checkpoint import UsageError
from model import Transformer


def transformers_copy(model: Transformer) -> torch.nn.Module:
    try:
        from scripts.hf_format import to_transformers

        return to_transformers(model)
    except ImportError:
        raise UsageError("the transformers comparison needs transformers (pip install -r requirements-dev.txt)") from None


def hf_decode_rate(hf: torch.nn.Module, prompt: list[int], n: int) -> float:
    """transformers generate() for exactly n tokens, minus a 1-token generate (its prefill), per decoded token."""
    ids = torch.tensor([prompt])

    def timed(k):
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    return (n - 1) / (timed(n) - timed(1))


def hf_generate(hf: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos_ids: set[int],
                sampling: s3d.Sampling) -> s3d.Result:
    """transformers generate() on the same weights, timed like ours: a streamer marks the first new token."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        calls, first = 0, None

        def put(self, value):  # called once with the prompt, then once per new token
            self.calls += 1
            self.first = time.perf_counter() if self.calls == 2 else self.first

        def end(self):
            pass

    streamer = FirstToken()
    t0 = time.perf_counter()
    mode = dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or 0,
                top_p=sampling.top_p or 1.0) if sampling.temperature > 0 else dict(do_sample=False)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                      pad_token_id=sorted(eos_ids)[0], streamer=streamer, **mode)[0, len(prompt):].tolist()
    t1 = time.perf_counter()
    first = streamer.first or t1
    return s3d.Result(out, time_to_first_token=first - t0, decode_time=t1 - first)
