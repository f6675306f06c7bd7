"""MMDialog evaluation at the test split's scale: time and peak memory against the number of
dialogues, each with 999 negative texts and 999 negative images (MMDialog's protocol).

    python benchmarks/bench_eval_scale.py                          # 1k, 3k, 10k dialogues
    python benchmarks/bench_eval_scale.py --sizes 1000 3000 --one-pass   # also the unchunked way

A synthetic split in MMDialog's format (JSON Lines, distinct negative texts per dialogue, as in
the real test split) runs through `unimur.evaluation.mmdialog.protocol.evaluate_mmdialog`, the function behind
`evals/eval_mmdialog.py`, with precomputed image embeddings (what `extract_vis_emb.py` writes)
and a stub embedder whose query and text embeddings are random: this times the evaluation's
own work (reading, pools, scoring, ranking), not a model. Each size runs in a fresh process so
its peak RSS is its own. `--one-pass` also runs each size as a single chunk, which is how the
evaluation worked before it was chunked (one table of every candidate text).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_split(root: Path, n: int, negatives: int, n_media: int) -> Path:
    folder = root / "MMDialog" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "conversations.json", "w") as f:
        for d in range(n):
            media = [str(-(10**18) - (d * 7919 + j * 104729) % n_media) for j in range(negatives + 1)]
            f.write(json.dumps({
                "conversation_id": d,
                "conversation": [{"turn": [{"__TEXT__": f"hello, can you show me thing {d}"}]},
                                 {"turn": [{"__TEXT__": f"here is thing {d}"}, {"__MEDIA__": media[0]}]}],
                "negative_candidate_media_keys": media[1:],
                "negative_candidate_texts": [f"candidate reply {d}-{j} :smile:" for j in range(negatives)],
            }) + "\n")
    return root / "MMDialog"


class RandomEmbedder:
    """Random unit vectors of the right size: the evaluation's work without a model's."""

    supports_text = True

    def __init__(self, dim: int):
        import torch

        self.dim, self.torch = dim, torch
        self.g = torch.Generator().manual_seed(0)

    def _rand(self, n: int):
        return self.torch.nn.functional.normalize(self.torch.randn(n, self.dim, generator=self.g), dim=-1)

    def embed_queries(self, contexts):
        return self._rand(len(contexts))

    def embed_texts(self, texts):
        return self._rand(len(texts))

    def clip_text_embeds(self, texts):
        return self._rand(len(texts))


def child(n: int, negatives: int, dim: int, chunk: int, workdir: Path) -> dict:
    import torch

    from unimur.evaluation.mmdialog.protocol import evaluate_mmdialog
    from unimur.inference.image_embeddings import ImageEmbeddings

    n_media = 20_000
    t0 = time.perf_counter()
    root = write_split(workdir / f"n{n}", n, negatives, n_media)
    t_write = time.perf_counter() - t0
    ids = [str(-(10**18) - k) for k in range(n_media)]
    emb = ImageEmbeddings(ids, torch.nn.functional.normalize(torch.randn(n_media, dim), dim=-1),
                          cap_features=torch.randn(n_media, 8))
    t0 = time.perf_counter()
    res = evaluate_mmdialog(RandomEmbedder(dim), root, embeddings=emb, n_negatives=negatives,
                            chunk_size=chunk, n_examples=0)
    seconds = time.perf_counter() - t0
    return {"dialogues": n, "chunk": chunk, "seconds": seconds, "write_s": t_write,
            "dialogues_per_s": n / seconds, "texts_embedded": res["counts"]["texts_embedded"],
            "texts_per_s": res["counts"]["texts_embedded"] / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "text_R@10": res["metrics"]["text"]["R@10"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--negatives", type=int, default=999)
    ap.add_argument("--dim", type=int, default=768, help="retrieval-space size (ViT-L/14: 768)")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--one-pass", action="store_true", help="also run each size as one chunk")
    ap.add_argument("--child", nargs=3, type=int, metavar=("N", "CHUNK", "DIM"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        n, chunk, dim = args.child
        print(json.dumps(child(n, args.negatives, dim, chunk, Path(args.workdir))))
        return
    print(f"command: python benchmarks/bench_eval_scale.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{'dialogues':>9} {'chunk':>6} {'eval s':>8} {'dialogues/s':>12} {'texts embedded':>15} "
          f"{'texts/s':>10} {'peak RSS MiB':>13}")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for chunk in [args.chunk_size] + ([n] if args.one_pass else []):
                cmd = [sys.executable, __file__, "--child", str(n), str(chunk), str(args.dim),
                       "--negatives", str(args.negatives), "--workdir", tmp]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    print(f"{n:>9} {chunk:>6} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{n:>9} {chunk:>6} {r['seconds']:>8.1f} {r['dialogues_per_s']:>12.1f} "
                      f"{r['texts_embedded']:>15,} {r['texts_per_s']:>10,.0f} {r['peak_rss_mib']:>13,.0f}")


if __name__ == "__main__":
    main()
