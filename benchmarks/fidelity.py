"""End-to-end fidelity: all-MiniLM-L6-v2 sentence embeddings with KDEformer in every layer vs exact.

    python -m benchmarks.fidelity [--quick] [--docs 32] [--seeds 1] [--no-write]

Documents are built from the shipped corpus (`kdeformer.sources.corpus()`, 45 paragraphs of our own
writing on 15 topics): each document concatenates randomly drawn paragraphs (seeded) until it holds at
least `--min-tokens` tokens (default 384, cut at 512), long enough that the approximation matters (with
a block of 64 keys, a 400-token document has 7 blocks). Embeddings are mean-pooled over the tokens and
L2-normalised, as the model was trained (sentence-transformers pipeline: Transformer, Pooling(mean),
Normalize). Every budget runs KDEformer in all 6 layers.

Measured per budget (bucket_size / sample_size):
  * cosine(exact, KDEformer) per document: mean and minimum;
  * document-to-document nearest neighbours (each document against the others), KDEformer embeddings
    for every document vs exact ones: top-1 agreement and recall@5 overlap |top5_exact & top5_kde| / 5;
  * paragraph-to-document retrieval: each corpus paragraph (exact embedding, it is short) ranks the
    documents; top-1 agreement with the exact ranking, and hit@1 = the top document contains it;
  * seconds per document (forward pass, this machine).
The "exact-equivalent" row (bucket_size >= N: one block with every key) must reproduce the exact
embeddings to float round-off; the script checks it.

Note: MiniLM was trained on at most 256 tokens; documents of 384-512 tokens are legal (512 positions)
but longer than anything it saw in training, which matters for absolute quality, not for the comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUDGETS = [(16, 32), (32, 64), (64, 128), (128, 256)]
EXACT_EQUIVALENT = (512, 1)  # one block of every key (N <= 512): exact attention, samples unused
MAX_TOKENS = 512


def build_documents(tokenizer, paragraphs: list[str], num_docs: int, min_tokens: int, seed: int):
    """num_docs documents of >= min_tokens tokens, each a seeded random draw of distinct paragraphs.

    Returns (texts, members) where members[j] is the set of paragraph indices in document j.
    """
    rng = np.random.default_rng(seed)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in paragraphs]
    texts, members = [], []
    for _ in range(num_docs):
        order = rng.permutation(len(paragraphs))
        chosen, total = [], 2  # [CLS] and [SEP]
        for i in order:
            chosen.append(int(i))
            total += lengths[i]
            if total >= min_tokens:
                break
        texts.append("\n\n".join(paragraphs[i] for i in chosen))
        members.append(set(chosen))
    return texts, members


def encode(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, list[int], float]:
    """Mean-pooled, L2-normalised embeddings (n, 384), token counts, and seconds per text."""
    embs, counts = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for text in texts:  # one at a time: the seconds are those of one forward pass per document
            enc = tokenizer(text, truncation=True, max_length=MAX_TOKENS, padding=False, return_tensors="pt")
            hidden = model(**enc).last_hidden_state  # (1, N, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (1, N, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1)  # (1, 384)
            embs.append(torch.nn.functional.normalize(pooled, dim=-1)[0])
            counts.append(enc["input_ids"].shape[1])
    seconds = (time.perf_counter() - start) / max(1, len(texts))
    return torch.stack(embs).double(), counts, seconds


def topk_excluding_self(sim: torch.Tensor, k: int) -> torch.Tensor:
    sim = sim.clone()
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=-1).indices  # (n, k)


def compare(exact_docs, approx_docs, queries, members) -> dict:
    """Fidelity figures of one set of approximate document embeddings against the exact ones."""
    cos = (exact_docs * approx_docs).sum(-1)  # (n,) embeddings are unit vectors
    k = min(5, exact_docs.shape[0] - 1)
    nn_exact = topk_excluding_self(exact_docs @ exact_docs.T, k)  # (n, k)
    nn_approx = topk_excluding_self(approx_docs @ approx_docs.T, k)  # (n, k)
    top1 = (nn_exact[:, 0] == nn_approx[:, 0]).double().mean()
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(nn_exact, nn_approx)])
    q_exact = (queries @ exact_docs.T).argmax(-1)  # (m,) best document per paragraph
    q_approx = (queries @ approx_docs.T).argmax(-1)
    hit = np.mean([p in members[int(d)] for p, d in enumerate(q_approx)])
    return {
        "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "nn_top1": float(top1),
        "nn_recall5": float(overlap), "q_top1": float((q_exact == q_approx).double().mean()), "q_hit1": float(hit),
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 documents, 3 budgets (a smoke run)")
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=384)
    parser.add_argument("--seeds", type=int, default=1, help="KDEformer seeds averaged per budget")
    parser.add_argument("--sampling", default=None,
                        help="sampling mode(s), comma separated (default: the core's default); the first is "
                             "used for the per-layer table")
    parser.add_argument("--per-layer", default="64/128",
                        help="budget for the one-layer-at-a-time table (KDEformer in a single layer), or 'none'")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args(argv)


def load_models():
    """(tokenizer, exact SDPA model, KDEformer model) of all-MiniLM-L6-v2, offline."""
    from transformers import AutoModel

    from kdeformer import hf, sources

    path = sources.minilm_path()
    _, tokenizer = sources.load_model(path)
    exact_model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    kde_model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    hf.use_kdeformer(kde_model)
    return tokenizer, exact_model, kde_model


def budget_row(kde_model, tokenizer, texts, ref: dict, sampling: str, budget: tuple, seeds: int):
    """One table row (KDEformer in every layer at one budget), and the max |difference| from exact."""
    from kdeformer import hf

    bucket, sample = budget
    results, secs, diff = [], [], None
    for seed in range(seeds):
        with hf.settings(bucket_size=bucket, sample_size=sample, seed=seed, sampling=sampling):
            approx, _, sec = encode(kde_model, tokenizer, texts)
        results.append(compare(ref["docs"], approx, ref["queries"], ref["members"]))
        secs.append(sec)
        diff = float((approx - ref["docs"]).abs().max())
        if budget == EXACT_EQUIVALENT:
            break  # deterministic: no sampling happens
    mean = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
    label = "exact-equivalent (512)" if budget == EXACT_EQUIVALENT else f"{bucket} / {sample}"
    row = [label, sampling, f"{mean['cos_mean']:.4f}", f"{mean['cos_min']:.4f}", f"{mean['nn_top1']:.3f}",
           f"{mean['nn_recall5']:.3f}", f"{mean['q_top1']:.3f}", f"{mean['q_hit1']:.3f}", f"{np.mean(secs):.3f}"]
    print(" | ".join(row), flush=True)
    return row, diff


def per_layer_table(kde_model, tokenizer, texts, ref: dict, sampling: str, budget: str) -> str:
    """KDEformer in one layer at a time (exact attention in the others), as a markdown table."""
    from benchmarks._report import markdown_table
    from kdeformer import hf

    if budget == "none":
        return ""
    bucket, sample = (int(x) for x in budget.split("/"))
    rows = []
    for layer in [*range(kde_model.config.num_hidden_layers), None]:
        with hf.settings(bucket_size=bucket, sample_size=sample, seed=0, sampling=sampling,
                         layers=None if layer is None else [layer]):
            approx, _, _ = encode(kde_model, tokenizer, texts)
        r = compare(ref["docs"], approx, ref["queries"], ref["members"])
        rows.append(["all" if layer is None else str(layer), f"{r['cos_mean']:.4f}", f"{r['cos_min']:.4f}",
                     f"{r['nn_recall5']:.3f}", f"{r['q_top1']:.3f}"])
        print("layer", " | ".join(rows[-1]), flush=True)
    return (f"KDEformer ({bucket} / {sample}, sampling {sampling}) in one layer only, exact attention in the "
            "others:\n\n" + markdown_table(["KDEformer layer", "cos mean", "cos min", "NN recall@5", "query top-1"],
                                             rows) + "\n\n")


def padding_check(kde_model, tokenizer, texts: list[str], sampling: str, budget=(16, 32)) -> float:
    """Max relative difference of a token's hidden state: the texts in one padded batch vs each text alone."""
    from kdeformer import hf

    with torch.no_grad(), hf.settings(bucket_size=budget[0], sample_size=budget[1], seed=0, sampling=sampling):
        enc = tokenizer(texts, truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt")
        batch = kde_model(**enc).last_hidden_state  # (b, N, 384)
        worst = 0.0
        for i, text in enumerate(texts):
            one = tokenizer(text, truncation=True, max_length=MAX_TOKENS, padding=False, return_tensors="pt")
            alone = kde_model(**one).last_hidden_state[0]  # (n_i, 384)
            rel = (batch[i, : alone.shape[0]] - alone).norm(dim=-1) / alone.norm(dim=-1)
            worst = max(worst, float(rel.max()))
    return worst


def report(ref: dict, counts, num_docs: int, seeds: int, tables: str, calib: str, exact_check, padding: str,
           argv) -> str:
    """The RESULTS.md section's body."""
    n_par = ref["queries"].shape[0]
    ok = exact_check is not None and exact_check < 1e-5
    command = "python -m benchmarks.fidelity" + "".join(" " + a for a in (argv if argv is not None else sys.argv[1:]))
    return (
        f"all-MiniLM-L6-v2 with KDEformer in all 6 layers vs exact attention. {num_docs} documents of "
        f"{min(counts)}-{max(counts)} tokens (mean {np.mean(counts):.0f}), each a seeded random draw of "
        f"paragraphs from the shipped corpus ({n_par} paragraphs, 15 topics); embeddings are "
        "mean-pooled and L2-normalised. NN = each document's nearest other documents (KDEformer for every "
        f"document vs exact); query = each of the {n_par} paragraphs (exact embedding) ranking the "
        "documents; hit@1 = the top document contains that paragraph. "
        f"{seeds} seed(s) per budget; default settings otherwise (num_projs 7, Gray order).\n\n"
        f"{tables}"
        f"For scale, the {calib} (documents share some paragraphs); a KDEformer cosine near that mean "
        "means the document's embedding has drifted about as far as another document's.\n\n"
        f"Exact-equivalent check (bucket_size >= N): max |embedding difference| = {exact_check:.2e} "
        f"({'OK' if ok else 'FAILED'}, tolerance 1e-5).\n\n"
        f"{padding}\n\n"
        f"Command: `{command}`. MiniLM was trained on at most 256 tokens; these documents are longer (legal up "
        "to 512 positions)."
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks._report import markdown_table, write_section
    from kdeformer import sources
    from kdeformer.defaults import KDE_DEFAULTS

    tokenizer, exact_model, kde_model = load_models()
    paragraphs = sources.corpus()
    num_docs = 12 if args.quick else args.docs
    budgets = [BUDGETS[0], BUDGETS[2], EXACT_EQUIVALENT] if args.quick else [*BUDGETS, EXACT_EQUIVALENT]
    samplings = args.sampling.split(",") if args.sampling else [KDE_DEFAULTS.sampling]
    texts, members = build_documents(tokenizer, paragraphs, num_docs, args.min_tokens, seed=0)
    exact_docs, counts, exact_sec = encode(exact_model, tokenizer, texts)
    queries, _, _ = encode(exact_model, tokenizer, paragraphs)
    ref = {"docs": exact_docs, "queries": queries, "members": members}
    off = (exact_docs @ exact_docs.T)[~torch.eye(num_docs, dtype=torch.bool)]  # exact cosines between documents
    calib = f"exact cosine between two different documents: mean {off.mean():.3f}, max {off.max():.3f}"
    print(calib, flush=True)
    print(f"{num_docs} documents, {min(counts)}-{max(counts)} tokens (mean {np.mean(counts):.0f}); "
          f"{len(paragraphs)} paragraph queries; exact {exact_sec:.3f} s/doc", flush=True)
    base = compare(exact_docs, exact_docs, queries, members)
    rows = [["exact (sdpa)", "-", "1", "1", "1", "1", "1", f"{base['q_hit1']:.3f}", f"{exact_sec:.3f}"]]
    exact_check = None
    for sampling in samplings:
        for budget in budgets:
            row, diff = budget_row(kde_model, tokenizer, texts, ref, sampling, budget, args.seeds)
            rows.append(row)
            if budget == EXACT_EQUIVALENT:
                exact_check = diff if exact_check is None else max(exact_check, diff)
    header = ["bucket / sample", "sampling", "cos mean", "cos min", "NN top-1", "NN recall@5",
              "query top-1", "query hit@1", "s / doc"]
    tables = markdown_table(header, rows) + "\n\n"
    tables += per_layer_table(kde_model, tokenizer, texts, ref, samplings[0], args.per_layer)
    pad = padding_check(kde_model, tokenizer, texts[:3], samplings[0])
    padding = (f"Padding check (16 / 32, sampling {samplings[0]}): the first 3 documents in one padded batch vs "
               f"each alone, max relative difference of a token's hidden state = {pad:.2e}.")
    print(padding, flush=True)
    body = report(ref, counts, num_docs, args.seeds, tables, calib, exact_check, padding, argv)
    print(f"exact-equivalent max |diff| = {exact_check:.2e}")
    if not args.no_write:
        print("wrote", write_section("fidelity", "End-to-end fidelity: MiniLM embeddings with KDEformer", body))
    return 0 if exact_check is not None and exact_check < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
