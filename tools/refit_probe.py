"""Hypothesis check for issue 10: does a least-squares refit of the kept o_proj / down_proj columns
beat the mean (bias-only) compensation on the same pruned structure?

Not a product path. It loads the parent in transformers (float32), takes a pruned structure from an
export's `bonsai_export.json` (kept heads and MLP units per layer), and compensates each layer in
order on the compensated model's own activations over calibration windows:

- `mean`: the removed inputs' mean contribution goes into the bias (FLAP's compensation);
- `ls`: the kept columns and the bias are refitted so that the projection's output on the kept
  inputs matches the dense projection's output (ridge towards the original weights, `--damp`
  times the mean diagonal of the inputs' second moments);
- `ls-parent`: the same refit from the parent's activations (every layer's statistics from one
  dense pass of the unpruned model, as the search's priors are gathered), not the compensated
  model's own.

Perplexity is measured by transformers on the first --eval-tokens tokens of the test text in
windows of 2,048, as tools/bench_quality.py's streamed evaluator reads them (the parent gives the
same 20.82). One JSON record per structure (kind "refit-probe"); `--out DIR` writes it there.

  python tools/refit_probe.py --parent /work/smollm2 --structure RUN/bonsai_export.json --seed 0 \
      --calib ../shared/data/wikitext2-valid.txt --eval ../shared/data/wikitext2-raw-test.txt
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import commit, hardware  # noqa: E402

from bonsai_lite.calib.data import calibration_tokens, load_tokenizer, read_text, tokenize, windows  # noqa: E402


def refit(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kept: torch.Tensor, *, mode: str,
          damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """New (weight, bias) of a projection that keeps input columns `kept`. `gram` is the second
    moment of [inputs, 1] over the calibration tokens ((d + 1) x (d + 1)); the target is the dense
    projection's output on the same inputs. Removed columns come back as zeros."""
    d = weight.shape[1]
    target = torch.cat([weight, bias[:, None]], 1).double()  # output = [x, 1] @ target.T
    new = torch.zeros_like(weight, dtype=torch.float64)
    if mode == "mean":
        removed = torch.ones(d, dtype=torch.bool)
        removed[kept] = False
        mean = gram[-1, :-1] / gram[-1, -1]
        new[:, kept] = weight[:, kept].double()
        return new, bias.double() + weight[:, removed].double() @ mean[removed]
    rows = torch.cat([kept, torch.tensor([d])])
    a = gram[rows][:, rows].clone()
    rhs = gram[rows] @ target.T
    lam = damp * a.diagonal()[:-1].mean()
    idx = torch.arange(len(kept))
    a[idx, idx] += lam
    rhs[:-1] += lam * weight[:, kept].T.double()  # shrink towards the original weights, not zero
    beta = torch.linalg.solve(a, rhs)
    new[:, kept] = beta[:-1].T
    return new, beta[-1]


@torch.no_grad()
def compensate(model, layers_kept: list[dict], calib: torch.Tensor, *, mode: str, damp: float, batch: int = 8):
    inner, cfg = model.model, model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hs = inner.embed_tokens(calib)
    pe = inner.rotary_emb(hs, torch.arange(calib.shape[1])[None])

    def run(layer):
        out = []
        for b in range(0, len(hs), batch):
            x = hs[b:b + batch]
            r = layer(x, position_embeddings=tuple(p.expand(len(x), -1, -1) for p in pe), attention_mask=None)
            out.append(r[0] if isinstance(r, tuple) else r)
        return torch.cat(out)

    def grams(layer, projs):
        out, handles = [], []
        for proj in projs:
            d = proj.in_features
            out.append(torch.zeros(d + 1, d + 1, dtype=torch.float64))

            def hook(_mod, inp, gram=out[-1], d=d):
                x = inp[0].reshape(-1, d).double()
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
                gram.add_(x.T @ x)

            handles.append(proj.register_forward_pre_hook(hook))
        nxt = run(layer)
        for h in handles:
            h.remove()
        return out, nxt

    sequential = mode != "ls-parent"
    for layer, kept in zip(inner.layers, layers_kept):
        heads = torch.tensor([h * hd + i for h in kept["heads"] for i in range(hd)], dtype=torch.long)
        pairs = ((layer.self_attn.o_proj, heads), (layer.mlp.down_proj, torch.tensor(kept["mlp"], dtype=torch.long)))
        if not sequential:  # both statistics and the next layer's input from the unpruned layer
            parent_grams, parent_next = grams(layer, [p for p, _ in pairs])
        for i, (proj, cols) in enumerate(pairs):
            # sequential: the MLP's statistics come after the attention's refit, on the refitted model
            gram = grams(layer, [proj])[0][0] if sequential else parent_grams[i]
            bias = proj.bias if proj.bias is not None else torch.zeros(proj.out_features)
            w, b = refit(gram, proj.weight, bias, cols, mode="ls" if mode == "ls-parent" else mode, damp=damp)
            proj.weight.copy_(w.float())
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features))
            proj.bias.copy_(b.float())
        hs = run(layer) if sequential else parent_next


@torch.no_grad()
def perplexity(model, wins: torch.Tensor) -> float:
    return math.exp(sum(model(w[None], labels=w[None]).loss.item() for w in wins) / len(wins))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", required=True)
    ap.add_argument("--structure", required=True, help="an export's bonsai_export.json")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--modes", default="mean,ls")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--parent-ppl", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", help="directory for the JSON record")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = load_tokenizer(args.parent)
    calib = calibration_tokens(tokenize(tok, read_text(args.calib)), samples=args.samples, seq_len=args.seq, seed=args.seed)
    wins = windows(tokenize(tok, read_text(args.eval)), 2048, max_tokens=args.eval_tokens)
    export = json.loads(Path(args.structure).read_text())

    def load():
        return AutoModelForCausalLM.from_pretrained(args.parent, dtype=torch.float32).eval()

    rec = {"kind": "refit-probe", "parent": args.parent, "structure": str(Path(args.structure).parent.name),
           "method": export.get("metadata", {}).get("method"), "sparsity": export.get("metadata", {}).get("sparsity"),
           "calib_samples": args.samples, "calib_seq_len": args.seq, "seed": args.seed, "damp": args.damp,
           "eval_tokens": int(wins.numel()), "seq_len": 2048, "perplexity": {}, "seconds": {}}
    if args.parent_ppl:
        rec["perplexity"]["parent"] = perplexity(load(), wins)
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        model = load()
        compensate(model, export["layers"], calib, mode=mode, damp=args.damp)
        rec["seconds"][mode] = round(time.perf_counter() - t0, 1)
        rec["perplexity"][mode] = perplexity(model, wins)
    rec.update(hardware=hardware(), **commit(), command=" ".join(sys.argv))
    print(json.dumps(rec))
    if args.out:
        name = f"refit-{rec['structure']}-d{args.damp:g}{'-' + args.tag if args.tag else ''}.json"
        (Path(args.out) / name).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
