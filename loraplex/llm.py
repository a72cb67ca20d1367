"""The offline API: `LLM(model).generate(prompts, params)` and `LLM.chat(messages)`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import RequestOutput, SamplingParams
from loraplex.lora.merge import MergeSpec
from loraplex.tokenization import encode_chat

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """A base model loaded for offline batched generation.

    `model` is `"demo"`, a Hugging Face checkpoint folder or a `.gguf` file. Keyword arguments are
    the fields of `ModelConfig`, `CacheConfig`, `SchedulerConfig` and `LoRAConfig`.
    """

    def __init__(self, model: str = "demo", **options: Any) -> None:
        try:
            config = EngineConfig.from_options(model=model, **options)
        except TypeError as e:
            raise TypeError(f"LLM() got an {e}") from None
        self.engine = Engine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter_id: str | None | Sequence[str | None] = None, *, merge: MergeSpec | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text, tokenized as the model's tokenizer does by default, or token ids).

        `adapter_id`: a PEFT LoRA adapter folder for every prompt, or a list with one per prompt
        (None = the base model). All prompts are batched together, whatever their adapters; outputs
        come back in prompt order. `merge` serves every prompt with a weighted merge of adapters instead.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list: list[SamplingParams] = _one_per_prompt(
            params or SamplingParams(), len(prompts), lambda v: isinstance(v, SamplingParams), "SamplingParams")
        adapters: list[str | None] = _one_per_prompt(
            adapter_id, len(prompts), lambda v: v is None or isinstance(v, str), "adapter ids")
        request_ids = []
        try:
            for prompt, p, adapter in zip(prompts, params_list, adapters, strict=True):
                request_id = f"offline-{next(self._ids)}"
                if isinstance(prompt, str):
                    self.engine.add_request(request_id, self._encode(prompt), p, prompt=prompt, adapter_id=adapter,
                                            merge=merge, every_token=False)
                else:
                    self.engine.add_request(request_id, list(prompt), p, adapter_id=adapter, merge=merge,
                                            every_token=False)
                request_ids.append(request_id)
        except BaseException:
            for request_id in request_ids:  # one bad prompt or adapter: queue nothing of this call
                self.engine.abort(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None,
             adapter_id: str | None | Sequence[str | None] = None, *, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the model's chat template.

        `adapter_id` as for `generate`: one for every conversation, or one per conversation.
        """
        conversations: list[list[Message]] = (
            [messages] if messages and isinstance(messages[0], dict) else messages)  # type: ignore[list-item,assignment]
        ids = [encode_chat(self.tokenizer, c) for c in conversations]
        return self.generate(ids, params, adapter_id, use_tqdm=use_tqdm)

    def _encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass prompts as lists of token ids")
        return list(self.tokenizer(prompt).input_ids)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        bar = tqdm(total=len(request_ids), desc="generating", disable=not use_tqdm)
        try:
            while len(final) < len(wanted) and self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.error is not None and out.request_id in wanted:
                        raise out.error
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for request_id in wanted - final.keys():
                self.engine.abort(request_id)
        return [final[r] for r in request_ids]


def _one_per_prompt(value: Any, n: int, is_single: Callable[[Any], bool], what: str) -> list[Any]:
    """`value` repeated for each of `n` prompts, or `value` itself when it is already one per prompt."""
    if is_single(value):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"got {len(value)} {what} for {n} prompts")
    return list(value)
