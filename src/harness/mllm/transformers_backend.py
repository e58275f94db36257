"""Any image-text-to-text model through the generic transformers API: the processor's chat
template, ``AutoModelForImageTextToText`` and ``generate``."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from harness.mllm.base import MLLM, Answer, Request
from harness.types import HarnessError
from harness.utils import seeded

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")


def offline_help(model: str, error: Exception) -> HarnessError:
    """The message for a model that is neither a local folder nor in the Hugging Face cache."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return HarnessError(
        f"mllm.model={model!r} is not a local folder and is not in the Hugging Face cache ({HF_HUB_CACHE}), "
        f"and it cannot be downloaded here ({type(error).__name__}). Either download it where there is network "
        f"(`huggingface-cli download {model}`) and point HF_HOME at that cache, or set mllm.model to a local "
        "folder saved with save_pretrained; with no model at all, use mllm=verbaliser.")


def generated_lengths(new_tokens: Any, eos: int | list[int] | None) -> list[int]:
    """Tokens generated per row, up to and including the first end-of-text token."""
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    out = []
    for row in new_tokens.tolist():
        ends = [k for k, tok in enumerate(row) if tok in eos_ids]
        out.append(ends[0] + 1 if ends else len(row))
    return out


class TransformersVLM(MLLM):
    """A transformers vision-language model, loaded once per job.

    The prompt goes through the processor's chat template (one ``{"type": "image"}`` entry per
    rendered image, then the text; a system message first where given), the images through the
    processor, and ``model.generate`` decodes with the logged settings (greedy by default;
    ``num_samples`` sequences per request when sampling). Requests are batched ``batch_size`` at
    a time with left padding. ``local_files_only`` (default: on when ``HF_HUB_OFFLINE`` is set)
    keeps loading off the network; a model that is missing gives a message saying what to do.

    Args:
        model: hub id (e.g. ``llava-hf/llava-1.5-7b-hf``) or a local folder.
        revision: hub revision (branch, tag or commit).
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        device: torch device (``cpu``, ``cuda``, ``cuda:1``, ``auto`` for accelerate's placement).
        batch_size: requests per ``generate`` call.
        processor_kwargs: extra keyword arguments for the processor call (e.g. ``max_pixels``).
        local_files_only: never touch the network (``null``: follow ``HF_HUB_OFFLINE``).
        decoding: see :class:`~harness.mllm.base.Decoding`.
    """

    backend = "transformers"

    def __init__(self, model: str, revision: str | None = None, dtype: str = "auto", device: str = "cpu",
                 batch_size: int = 1, processor_kwargs: dict[str, Any] | None = None,
                 local_files_only: bool | None = None, decoding: dict[str, Any] | None = None) -> None:
        super().__init__(model, decoding)
        if dtype not in DTYPES:
            raise HarnessError(f"mllm.dtype={dtype!r} is not valid; valid: {', '.join(DTYPES)}")
        self.revision, self.dtype, self.device = revision, dtype, str(device)
        self.batch_size = max(1, int(batch_size))
        self.processor_kwargs = dict(processor_kwargs or {})
        self.local_files_only = (os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
                                 if local_files_only is None else bool(local_files_only))
        self._loaded: tuple[Any, Any] | None = None
        self._check_available()

    def _check_available(self) -> None:
        """Offline, refuse a model that is neither a local folder nor cached, before any work."""
        from pathlib import Path

        if Path(self.model).is_dir() or not self.local_files_only:
            return
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(self.model, "config.json", revision=self.revision)
        except ValueError as e:  # not a valid repo id either
            raise offline_help(self.model, e) from None
        if not isinstance(found, str):
            raise offline_help(self.model, FileNotFoundError("not in the cache"))

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "revision": self.revision, "dtype": self.dtype,
                "processor_kwargs": self.processor_kwargs}

    def load(self) -> tuple[Any, Any]:
        """``(processor, model)``, loaded on first use."""
        if self._loaded is None:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            kw = {"revision": self.revision, "local_files_only": self.local_files_only}
            t0 = time.perf_counter()
            try:
                processor = AutoProcessor.from_pretrained(self.model, **kw)
                model = AutoModelForImageTextToText.from_pretrained(
                    self.model, dtype="auto" if self.dtype == "auto" else getattr(torch, self.dtype),
                    device_map=self.device if self.device == "auto" else None, **kw)
            except OSError as e:
                raise offline_help(self.model, e) from None
            if self.device != "auto":
                model = model.to(self.device)
            tok = getattr(processor, "tokenizer", None)
            if tok is not None:
                tok.padding_side = "left"  # generation continues the right end of every row
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
            self._loaded = (processor, model.eval())
            log.info("mllm %s loaded in %.1f s", self.model, time.perf_counter() - t0)
        return self._loaded

    def _prompt(self, processor: Any, req: Request) -> str:
        content = [{"type": "image"} for _ in req.images] + [{"type": "text", "text": req.prompt}]
        messages = [{"role": "user", "content": content}]
        if req.system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": req.system}]})
        if not getattr(processor, "chat_template", None):
            raise HarnessError(f"mllm.model={self.model!r}: its processor has no chat template")
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    def generate(self, requests: list[Request]) -> list[list[Answer]]:
        import torch

        processor, model = self.load()
        d = self.decoding
        out: list[list[Answer]] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            texts = [self._prompt(processor, r) for r in batch]
            images = [img for r in batch for img in r.images]
            inputs = processor(images=images or None, text=texts, padding=True, return_tensors="pt",
                               **self.processor_kwargs).to(model.device)
            gen = {"max_new_tokens": d.max_new_tokens, "do_sample": d.do_sample,
                   "num_return_sequences": d.num_samples}
            if d.min_new_tokens:
                gen["min_new_tokens"] = d.min_new_tokens
            if d.do_sample:
                gen.update(temperature=d.temperature, top_p=d.top_p)
            t0 = time.perf_counter()
            with seeded(d.seed), torch.inference_mode():  # sampling seeded, the caller's RNGs untouched
                seqs = model.generate(**inputs, **gen)
            latency = (time.perf_counter() - t0) / len(batch)
            n_in = inputs["input_ids"].shape[1]
            new = seqs[:, n_in:]
            texts_out = processor.batch_decode(new, skip_special_tokens=True)
            lengths = generated_lengths(new, model.generation_config.eos_token_id)
            for i in range(len(batch)):
                prompt_tokens = int(inputs["attention_mask"][i].sum())
                out.append([Answer(texts_out[j].strip(), latency, prompt_tokens, lengths[j],
                                   "length" if lengths[j] >= d.max_new_tokens else "stop")
                            for j in range(i * d.num_samples, (i + 1) * d.num_samples)])
        return out
