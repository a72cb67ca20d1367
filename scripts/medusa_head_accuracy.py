"""How often the `invoice-json-lookahead` adapter's Medusa heads draft the right token, teacher-forced.

    python scripts/medusa_head_accuracy.py [--sentences bench|train] [--n 48] [--adapter FOLDER]

The adapter's own greedy answers (loraplex, the invoice-json LoRA; made as the heads' training script makes
them) to `--n` invoice sentences, either this repository's benchmark sentences (loraplex.bench.speculative,
templates and names the heads never saw) or held-out sentences of the generator the heads were trained on
(scripts/train_medusa_heads.varied_invoices, another seed). The first 16 answers stand for the adapter's earlier
answers; over the others' answer positions, with HF transformers + PEFT hidden states, it prints each
head's top-1 accuracy and the mean leading run of right drafts (what a chain verification accepts per step,
at most) for the heads' argmax over:

    A  the whole vocabulary (what the engine drafts)
    B  the request's own tokens (prompt and answer so far)
    C  B and the tokens of the earlier answers

and, over the whole vocabulary, head 1's accuracy by the kind of token it has to draft (the JSON's keys and
punctuation, the amount's digits, the name's words: copied from the prompt) and the leading run a tree of
each head's top 3 could accept at most.
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
from scripts.train_medusa_heads import answers, prompt_ids, varied_invoices  # noqa: E402

HISTORY = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", choices=("bench", "train"), default="bench")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--adapter", type=Path, help="a lookahead adapter folder (default: the bundled one)")
    args = parser.parse_args()
    adapters = example_adapters()
    lora, lookahead = adapters["invoice-json"], args.adapter or adapters["invoice-json-lookahead"]
    base = resolve_model("demo")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if args.sentences == "train":
        sentences = varied_invoices(random.Random("heldout-check"), args.n, tokenizer)
    else:
        sentences = invoice_sentences(args.n, seed=11)
    outputs = answers(sentences, lora)  # as the heads' training script makes them
    prompts = [prompt_ids(tokenizer, s) for s in sentences]
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    heads = load_medusa(Path(lookahead), DecoderConfig.from_hf(hf.config))
    inner = PeftModel.from_pretrained(hf, str(lora)).eval().get_base_model().model  # output after the final norm
    lm_head = hf.get_output_embeddings().weight.detach()
    history = {t for a in outputs[:HISTORY] for t in a}
    k = heads.num_heads
    results: dict[str, list[tuple[int, list[bool]]]] = {"A": [], "B": [], "C": []}
    kinds: dict[str, list[tuple[bool, bool]]] = {"keys and punctuation": [], "digits": [], "name": []}
    tree_runs = []
    with torch.no_grad():
        for prompt, answer in zip(prompts[HISTORY:], outputs[HISTORY:], strict=True):
            ids = prompt + answer
            hidden = inner(input_ids=torch.tensor([ids])).last_hidden_state[0]
            for t in range(len(prompt) - 1, len(ids) - 2):  # h_t picked token t + 1; head i drafts t + 2 + i
                logits = heads.hidden(hidden[t:t + 1])[:, 0] @ lm_head.T  # [heads, vocab]
                targets = [ids[t + 2 + i] if t + 2 + i < len(ids) else None for i in range(k)]
                context = set(ids[:t + 2])
                top3 = logits.topk(3, -1).indices.tolist()
                tree_runs.append(next((i for i in range(k) if targets[i] not in top3[i]), k))
                if targets[0] is not None:
                    word = tokenizer.decode([targets[0]]).strip()
                    kind = "digits" if word.isdigit() else "name" if any(c.isalpha() for c in word) and word not in (
                        "name", "amount") else "keys and punctuation"
                    kinds[kind].append((top3[0][0] == targets[0], targets[0] in top3[0]))
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
    print("head 1 by what it drafts (A): " + ", ".join(
        f"{kind} {100 * sum(a for a, _ in v) / len(v):.0f} % (top 3: {100 * sum(b for _, b in v) / len(v):.0f} %, "
        f"{len(v)} positions)" for kind, v in kinds.items() if v))
    print(f"a tree of each head's top 3 (A): mean leading run {sum(tree_runs) / len(tree_runs):.2f} at most")


if __name__ == "__main__":
    main()
