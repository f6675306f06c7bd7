"""VisDial evaluation throughput: batched queries versus one dialogue at a time (the way
FROMAGe's released script loops), on the synthetic VisDial set.

    python benchmarks/bench_eval.py [--llm tiny-opt --visual-model tiny-clip] [--n-dialogues 200]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from unimur.config import ModelConfig  # noqa: E402
from unimur.data.synthetic.generator import generate  # noqa: E402
from unimur.data.visdial import build_visdial_query, load_visdial  # noqa: E402
from unimur.evaluation.visdial import evaluate_visdial  # noqa: E402
from unimur.inference.embedder import ModelEmbedder  # noqa: E402
from unimur.model.model import UniMuR  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="tiny-opt")
    ap.add_argument("--visual-model", default="tiny-clip")
    ap.add_argument("--text-model", default=None)
    ap.add_argument("--target-proj", default="none")
    ap.add_argument("--n-dialogues", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = UniMuR.build(ModelConfig(llm=args.llm, visual_model=args.visual_model, text_model=args.text_model,
                                     target_proj=args.target_proj)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate(tmp, seed=0, n_train=8, n_val=8, n_visdial=args.n_dialogues, n_mmdialog=2,
                         image_size=64, n_negatives=4)
        dialogs, _ = load_visdial(paths["visdial_dir"])
        queries = [[build_visdial_query(d)] for d in dialogs]
        rows = []
        for bs in (args.batch_size, 1):
            emb = ModelEmbedder(model, batch_size=bs, progress=False)
            t = time.perf_counter()
            emb.embed_queries(queries)
            q_time = time.perf_counter() - t
            t = time.perf_counter()
            res = evaluate_visdial(emb, paths["visdial_dir"])
            e_time = time.perf_counter() - t
            rows.append((bs, len(queries) / q_time, res["counts"]["dialogues_evaluated"] / e_time,
                         res["metrics"]["dialogue_to_image"]["R@1"]))
    print(f"command: python benchmarks/bench_eval.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"config: llm={args.llm} visual={args.visual_model} dialogues={len(queries)} "
          f"threads={torch.get_num_threads()} device=cpu")
    print(f"{'batch':>6s} {'query embedding q/s':>20s} {'whole eval dialogues/s':>24s} {'R@1 (same)':>11s}")
    for bs, q, e, r1 in rows:
        print(f"{bs:>6d} {q:>20.1f} {e:>24.1f} {r1:>11.2f}")
    print(f"batched / one-at-a-time: query embedding x{rows[0][1] / rows[1][1]:.1f}, "
          f"whole evaluation x{rows[0][2] / rows[1][2]:.1f}")


if __name__ == "__main__":
    main()
