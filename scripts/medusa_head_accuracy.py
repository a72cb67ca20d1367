"""How often the `invoice-json-lookahead` adapter's Medusa heads draft the right token, teacher-forced.

    python scripts/medusa_head_accuracy.py [--sentences bench|train] [--n 48]

The adapter's own greedy answers (loraplex, the invoice-json LoRA; made as the heads' training script makes
them) to `--n` invoice sentences, either this repository's benchmark sentences (loraplex.bench.speculative,
templates and names the heads never saw) or held-out sentences of the generator the heads were trained on
(scripts/train_example_adapters.py, another seed). The first 16 answers stand for the adapter's earlier
answers; over the others' answer positions, with HF transformers + PEFT hidden states, it prints each
head's top-1 accuracy and the mean leading run of right drafts (what a chain verification accepts per step,
at most) for the heads' argmax over:

    A  the whole vocabulary (what the engine drafts)
    B  the request's own tokens (prompt and answer so far)
    C  B and the tokens of the earlier answers
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loraplex.bench.speculative import invoice_sentences  # noqa: E402
from loraplex.examples import example_adapters  # noqa: E402
from loraplex.lora.medusa import load_medusa  # noqa: E402
from loraplex.model.decoder import DecoderConfig  # noqa: E402
from loraplex.paths import resolve_model  # noqa: E402
from scripts.train_example_adapters import build_invoice  # noqa: E402
from scripts.train_medusa_heads import answers  # noqa: E402

HISTORY = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", choices=("bench", "train"), default="bench")
    parser.add_argument("--n", type=int, default=48)
    args = parser.parse_args()
    adapters = example_adapters()
    lora, lookahead = adapters["invoice-json"], adapters["invoice-json-lookahead"]
    base = resolve_model("demo")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if args.sentences == "train":
        sentences = [e.user for e in build_invoice(random.Random("heldout-check"), args.n)]
    else:
        sentences = invoice_sentences(args.n, seed=11)
    outputs = answers(sentences, lora)  # as the heads' training script makes them
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True,
                                                       tokenize=False), add_special_tokens=False).input_ids
               for s in sentences]
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    heads = load_medusa(Path(lookahead), DecoderConfig.from_hf(hf.config))
    inner = PeftModel.from_pretrained(hf, str(lora)).eval().get_base_model().model  # output after the final norm
    lm_head = hf.get_output_embeddings().weight.detach()
    history = {t for a in outputs[:HISTORY] for t in a}
    k = heads.num_heads
    results: dict[str, list[tuple[int, list[bool]]]] = {"A": [], "B": [], "C": []}
    with torch.no_grad():
        for prompt, answer in zip(prompts[HISTORY:], outputs[HISTORY:], strict=True):
            ids = prompt + answer
            hidden = inner(input_ids=torch.tensor([ids])).last_hidden_state[0]
            for t in range(len(prompt) - 1, len(ids) - 2):  # h_t picked token t + 1; head i drafts t + 2 + i
                logits = heads.hidden(hidden[t:t + 1])[:, 0] @ lm_head.T  # [heads, vocab]
                targets = [ids[t + 2 + i] if t + 2 + i < len(ids) else None for i in range(k)]
                context = set(ids[:t + 2])
                for name, allowed in (("A", None), ("B", context), ("C", context | history)):
                    if allowed is None:
                        drafts = logits.argmax(-1).tolist()
                    else:
                        columns = torch.tensor(sorted(allowed))
                        drafts = columns[logits[:, columns].argmax(-1)].tolist()
                    right = [targets[i] is not None and drafts[i] == targets[i] for i in range(k)]
                    run = next((i for i, r in enumerate(right) if not r), k)
                    results[name].append((run, right))
    for name, rows in results.items():
        accuracy = [round(100 * sum(r[i] for _, r in rows) / len(rows)) for i in range(k)]
        print(f"{name}: {len(rows)} positions, heads' top-1 accuracy {accuracy} %, mean leading run "
              f"{sum(run for run, _ in rows) / len(rows):.2f}")


if __name__ == "__main__":
    main()
