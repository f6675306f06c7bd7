"""Evaluation core and scripts: hand-made fixtures in the real formats, scored by a stub embedder
whose vectors are chosen by hand so every rank is known; then one end-to-end run of both
scripts with a random-init tiny model on a small synthetic set."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unimur.data.mmdialog import media_path
from unimur.data.visdial import visdial_image_path
from unimur.evaluation.mmdialog.protocol import evaluate_mmdialog
from unimur.evaluation.report import format_table, save_examples_png, write_results
from unimur.evaluation.visdial import evaluate_visdial
from unimur.inference.image_embeddings import ImageEmbeddings, save_image_embeddings

# ----------------------------------------------------------------------------------------------
# A stub embedder over named axes
# ----------------------------------------------------------------------------------------------

AXES = ("red", "blue", "green", "purple", "a", "b", "c", "d", "junk")


def vec(**weights: float) -> torch.Tensor:
    """Unit vector with the given weights on named axes (e.g. vec(a=0.6, b=0.8))."""
    v = torch.zeros(len(AXES))
    for name, w in weights.items():
        v[AXES.index(name)] = w
    return F.normalize(v, dim=0)


class StubEmbedder:
    """Embedder whose vectors come from tables.

    Query = normalised sum of the vectors of every ``keywords`` key found in its text pieces,
    plus each image piece itself (the cap feature is the image's own vector). Unknown texts
    embed on the ``junk`` axis, which no query uses (cosine 0). Image files are "unreadable"
    when they start with b"BAD"; their content is otherwise ignored.
    """

    def __init__(self, images, texts=None, keywords=None, clip_texts=None, supports_text=True):
        self.images, self.texts = images, texts or {}
        self.keywords, self.clip_texts = keywords or {}, clip_texts or {}
        self.supports_text = supports_text
        self.query_calls, self.text_calls, self.image_calls = [], [], []

    def embed_queries(self, contexts):
        self.query_calls.append(contexts)
        rows = []
        for ctx in contexts:
            u = torch.zeros(len(AXES))
            for piece in ctx:
                if isinstance(piece, str):
                    u += sum((v for k, v in self.keywords.items() if k in piece), torch.zeros(len(AXES)))
                else:
                    u += piece
            rows.append(F.normalize(u, dim=0))
        return torch.stack(rows)

    def embed_texts(self, texts):
        if not self.supports_text:
            raise ValueError("no text retrieval space")
        self.text_calls.append(list(texts))
        return torch.stack([self.texts.get(t, vec(junk=1)) for t in texts])

    def clip_text_embeds(self, texts):
        return torch.stack([self.clip_texts.get(t, self.texts.get(t, vec(junk=1))) for t in texts])

    def embed_images(self, paths, ids=None):
        self.image_calls.append(list(ids))
        kept, skipped = [], Counter()
        for path, key in zip(paths, ids):
            path = Path(path)
            if not path.is_file():
                skipped["missing_image"] += 1
            elif path.read_bytes().startswith(b"BAD"):
                skipped["corrupt_image"] += 1
            else:
                kept.append(key)
        return self.embeddings(kept), skipped

    def embeddings(self, keys) -> ImageEmbeddings:
        e = torch.stack([self.images[k] for k in keys])
        return ImageEmbeddings(list(keys), e, cap_features=e.clone(), clip_embeds=e.clone())


# ----------------------------------------------------------------------------------------------
# VisDial fixture: 4 good dialogues, one with a missing image, one with a corrupt image
# ----------------------------------------------------------------------------------------------

VD_QUESTIONS = ["what is it", "anything else"]
VD_ANSWERS = ["alpha", "bravo", "charlie", "delta", "nothing", "echo"]
VD_KEYWORDS = {"alpha": vec(a=1), "bravo": vec(a=0.6, b=0.8), "charlie": vec(a=0.8, c=0.6),
               "delta": vec(b=1), "xray": 2 * vec(d=1)}
VD_IMAGES = {"101": vec(a=1), "102": vec(b=1), "103": vec(c=1), "104": vec(d=1), "106": vec(a=1)}


def write_visdial(root: Path) -> Path:
    def dialog(image_id, answer, caption="a photo"):
        rounds = [{"question": 0, "answer": answer, "answer_options": list(range(100)), "gt_index": 0},
                  {"question": 1, "answer": 4, "answer_options": list(range(100)), "gt_index": 3}]
        return {"image_id": image_id, "caption": caption, "dialog": rounds}

    dialogs = [dialog(101, 0), dialog(102, 1), dialog(105, 5), dialog(103, 2),
               dialog(104, 3, caption="a photo of xray"), dialog(106, 0)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "visdial_1.0_val.json").write_text(json.dumps(
        {"split": "val", "version": "1.0",
         "data": {"questions": VD_QUESTIONS, "answers": VD_ANSWERS, "dialogs": dialogs}}))
    for image_id in (101, 102, 103, 104, 106):  # 105 has no file
        path = visdial_image_path(root, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"BAD" if image_id == 106 else b"\xff\xd8\xff")
    return root


def vd_stub() -> StubEmbedder:
    return StubEmbedder(VD_IMAGES, keywords=VD_KEYWORDS)


def assert_metrics(m, r1, r5, r10, mrr, mean_rank, n):
    assert m["R@1"] == pytest.approx(r1) and m["R@5"] == pytest.approx(r5)
    assert m["R@10"] == pytest.approx(r10) and m["MRR"] == pytest.approx(mrr)
    assert m["mean_rank"] == pytest.approx(mean_rank) and m["n"] == n


def test_visdial_metrics_both_directions(tmp_path):
    stub = vd_stub()
    res = evaluate_visdial(stub, write_visdial(tmp_path / "VisualDialog"))
    # sim rows (dialogues 101..104) x cols (images 101..104):
    #   [1, 0, 0, 0], [.6, .8, 0, 0], [.8, 0, .6, 0], [0, 1, 0, 0]
    # dialogue->image ranks [1, 1, 2, 4] (104: one greater + two ties at lower columns)
    assert_metrics(res["metrics"]["dialogue_to_image"], 50, 100, 100, 0.6875, 2.0, 4)
    # image->dialogue ranks [1, 2, 1, 4]
    assert_metrics(res["metrics"]["image_to_dialogue"], 50, 100, 100, 0.6875, 2.0, 4)
    assert res["metrics"]["dialogue_to_image"]["median_rank"] == 1.5
    c = res["counts"]
    assert c["dialogues_evaluated"] == 4 and c["dialogues_skipped"] == 2
    assert c["skipped_dialogues"] == {"missing_image": 1, "unreadable_image": 1}
    assert c["unreadable_images"] == {"corrupt_image": 1}
    assert res["settings"]["context"] == "rounds" and res["settings"]["pool_size"] == 4
    # the query is FROMAGe's "Q: ...? A: ...." text, one string per dialogue
    assert stub.query_calls[0][0] == ["Q: what is it? A: alpha. Q: anything else? A: nothing."]
    assert res["examples"][3]["gt_rank"] == 4
    assert [ex["image_to_dialogue_rank"] for ex in res["examples"]] == [1, 2, 1, 4]
    assert [x["id"] for x in res["examples"][3]["retrieved_images"]] == ["102", "101", "103", "104"]


def test_visdial_caption_and_rounds_settings(tmp_path):
    root = write_visdial(tmp_path / "VisualDialog")
    res = evaluate_visdial(vd_stub(), root, context="caption+rounds")
    # the caption's "xray" lifts dialogue 104 onto its image: ranks [1, 1, 2, 1]
    assert_metrics(res["metrics"]["dialogue_to_image"], 75, 100, 100, 0.875, 1.25, 4)
    assert res["settings"]["context"] == "caption+rounds"
    stub = vd_stub()
    evaluate_visdial(stub, root, rounds=1)
    assert stub.query_calls[0][0] == ["Q: what is it? A: alpha."]
    with pytest.raises(ValueError, match="no dialogue left"):
        evaluate_visdial(vd_stub(), root, rounds=0)
    with pytest.raises(ValueError, match="context must be"):
        evaluate_visdial(vd_stub(), root, context="caption")


# ----------------------------------------------------------------------------------------------
# MMDialog fixture
# ----------------------------------------------------------------------------------------------

KR, KB, KG, KP = "-1000012098956892692", "2000012098956892692", "-3000012098956892692", "4"
KG2, KR2, KMISS, KBAD = "-55", "66", "-9999999999999999999", "-77"
MM_IMAGES = {KR: vec(red=1), KB: vec(blue=1), KG: vec(green=1), KP: vec(purple=1),
             KG2: vec(green=0.8, red=0.6), KR2: vec(red=1), KBAD: vec(red=1)}
MM_TEXTS = {"here red": vec(red=1), "blue thing": vec(blue=1),
            "green thing": vec(green=0.8, blue=0.6), "green stuff": vec(green=1)}
MM_KEYWORDS = {"show me red": vec(red=1), "green please": vec(green=1)}
MM_CLIP_TEXTS = {"green stuff": vec(green=0.6, red=0.8)}
NEG_TEXTS = ["blue thing", "green thing"]


def T(text):
    return {"__TEXT__": text}


def M(key):
    return {"__MEDIA__": key}


def dialogue(cid, *turns, neg_keys=(KB, KG)):
    return {"conversation_id": cid, "conversation": [{"turn": list(t)} for t in turns],
            "negative_candidate_media_keys": list(neg_keys), "negative_candidate_texts": NEG_TEXTS}


D_A = dialogue(1, [T("show me red")], [T("here red"), M(KR)], neg_keys=(KB, KMISS, KG))
D_B = dialogue(2, [M(KP)], [T("more like this")])
D_C = dialogue(3, [T("green please")], [T("green stuff"), M(KG2), M(KR2)], neg_keys=(KB, KG, KBAD))
D_EMPTY = dialogue(4, [T("hello")], [T("")])             # empty target turn
D_NO_TARGET = dialogue(5, [T("hello")], [M(KMISS)])      # target image has no file
MM_DIALOGUES = [D_A, D_B, D_C, D_EMPTY, D_NO_TARGET]
MM_NEG = 2  # usable negatives per modality in every pool above (a missing or unreadable image aside)


def write_mmdialog(root: Path, dialogues=MM_DIALOGUES, container="array") -> Path:
    folder = root / "test"
    folder.mkdir(parents=True, exist_ok=True)
    if container == "array":
        text = json.dumps(dialogues, indent=1)
    else:
        text = "\n".join(json.dumps(d) for d in dialogues) + "\n"
    (folder / "conversations.json").write_text(text)
    for key in MM_IMAGES:
        media_path(root, "test", key).write_bytes(b"BAD" if key == KBAD else b"\xff\xd8\xff")
    return root


def mm_stub(**kw) -> StubEmbedder:
    return StubEmbedder(MM_IMAGES, MM_TEXTS, MM_KEYWORDS, MM_CLIP_TEXTS, **kw)


def assert_mmdialog_metrics(m):
    # text ranks [A 1, B 3 (two ties at lower columns), C 1]
    assert_metrics(m["text"], 100 * 2 / 3, 100, 100, (1 + 1 / 3 + 1) / 3, 5 / 3, 3)
    # image ranks [A 1, C: KG2 2 (KG ahead), KR2 3 (KB tie + KG ahead; KG2 not counted)]
    assert_metrics(m["image"], 100 / 3, 100, 100, (1 + 1 / 2 + 1 / 3) / 3, 2.0, 3)
    assert_metrics(m["overall"], 50, 100, 100, (1 + 1 / 3 + 1 + 1 + 1 / 2 + 1 / 3) / 6, 11 / 6, 6)


def test_mmdialog_metrics_and_counts(tmp_path):
    stub = mm_stub()
    res = evaluate_mmdialog(stub, write_mmdialog(tmp_path / "MMDialog"), n_negatives=MM_NEG)
    m, c = res["metrics"], res["counts"]
    assert_mmdialog_metrics(m)
    assert m["image_retrieval_rate"] == 1.0
    # top-1 pairs: A (KR, "here red") 1; B (KB, "blue thing") 1; C (KG, "green stuff") 0.6
    assert m["cross_modal_consistency"] == pytest.approx(2.6 / 3)
    assert c["consistency_pairs"] == 3 and c["image_outputs"] == 3
    assert c["queries_evaluated"] == 3 and c["queries_skipped"] == 2
    assert c["skipped_queries"] == {"empty_target_turn": 1, "missing_target_image": 1}
    assert c["dropped_elements"] == {"empty_text_element": 1, "missing_negative_image": 1,
                                     "negative_image_unreadable": 1}
    assert c["unreadable_images"] == {"corrupt_image": 1}
    assert c["gt_texts"] == 3 and c["gt_images"] == 3
    assert c["pool_sizes"] == {"text": {"min": 3, "mean": 3.0, "max": 3},
                               "image": {"min": 2, "mean": 3.0, "max": 4}}
    # every distinct text and image embedded exactly once, in one call each
    assert len(stub.text_calls) == 1 and sorted(stub.text_calls[0]) == sorted(
        set(NEG_TEXTS) | {"here red", "more like this", "green stuff"})
    assert len(stub.image_calls) == 1 and len(stub.image_calls[0]) == len(set(stub.image_calls[0]))
    # the context image enters as its cap feature, and all queries go in one batch
    (contexts,) = stub.query_calls
    # (FROMAGe's dialogue prompt: the turn's speaker mark, then the image in its place)
    assert len(contexts) == 3 and contexts[1][0] == "Q:" and torch.equal(contexts[1][1], MM_IMAGES[KP])
    assert contexts[1][-1] == "\nA:"
    ex = res["examples"][2]
    assert ex["image_ranks"] == [2, 3] and ex["text_ranks"] == [1]
    assert ex["retrieved_texts"][0] == {"text": "green stuff", "score": pytest.approx(1.0), "is_gt": True}
    assert [x["is_gt"] for x in ex["retrieved_images"]] == [False, True, False, True]


def test_mmdialog_image_threshold(tmp_path):
    res = evaluate_mmdialog(mm_stub(), write_mmdialog(tmp_path / "MMDialog"), image_threshold=0.5,
                            n_negatives=MM_NEG)
    # B's best image scores 0 (its context is purple): no image output there
    assert res["metrics"]["image_retrieval_rate"] == pytest.approx(2 / 3)
    assert res["metrics"]["cross_modal_consistency"] == pytest.approx(0.8)  # A 1.0, C 0.6
    assert res["counts"]["consistency_pairs"] == 2
    assert res["settings"]["image_threshold"] == 0.5
    assert_mmdialog_metrics(res["metrics"])  # ranks do not depend on the threshold


def test_mmdialog_containers_agree(tmp_path):
    a = evaluate_mmdialog(mm_stub(), write_mmdialog(tmp_path / "array"), n_negatives=MM_NEG)
    b = evaluate_mmdialog(mm_stub(), write_mmdialog(tmp_path / "lines", container="jsonl"), n_negatives=MM_NEG)
    assert a["metrics"] == b["metrics"] and a["counts"] == b["counts"]
    assert [x["retrieved_texts"] for x in a["examples"]] == [x["retrieved_texts"] for x in b["examples"]]


def test_mmdialog_truncated_json_is_a_clear_error(tmp_path):
    root = write_mmdialog(tmp_path / "MMDialog")
    path = root / "test" / "conversations.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(ValueError, match="truncated"):
        evaluate_mmdialog(mm_stub(), root, n_negatives=MM_NEG)


def test_mmdialog_given_embeddings(tmp_path):
    root = write_mmdialog(tmp_path / "MMDialog", MM_DIALOGUES[:4])
    stub = mm_stub()
    given = stub.embeddings([KR, KB, KG, KP, KG2, KR2])  # KMISS and KBAD not in the file
    res = evaluate_mmdialog(stub, root, embeddings=given, n_negatives=MM_NEG)
    assert_mmdialog_metrics(res["metrics"])
    assert not stub.image_calls  # nothing re-embedded
    assert res["counts"]["dropped_elements"]["negative_image_not_in_embeddings"] == 2
    assert res["settings"]["embeddings"] == "given"
    # extract_vis_emb.py ids are file names relative to the image folder: matched by stem
    by_name = ImageEmbeddings([f"{k}.jpg" for k in given.ids], given.embeds, given.cap_features,
                              given.clip_embeds)
    assert evaluate_mmdialog(mm_stub(), root, embeddings=by_name, n_negatives=MM_NEG)["metrics"] == res["metrics"]

    # a context image missing from the file is dropped and counted (B then has no context)
    res = evaluate_mmdialog(mm_stub(), root, embeddings=stub.embeddings([KR, KB, KG, KG2, KR2]), n_negatives=MM_NEG)
    assert res["counts"]["dropped_elements"]["context_image_not_in_embeddings"] == 1
    assert res["counts"]["skipped_queries"]["empty_context_after_image_drop"] == 1
    assert res["counts"]["queries_evaluated"] == 2

    # a ground-truth image missing from the file is an error naming the cause
    root = write_mmdialog(tmp_path / "MMDialog2")
    with pytest.raises(ValueError, match="not in the embedding file"):
        evaluate_mmdialog(mm_stub(), root, embeddings=given, n_negatives=MM_NEG)


def test_mmdialog_short_pools_are_skipped_and_counted_never_scored(tmp_path):
    # the ground truth alone would be a free rank-1 hit; one negative an easier pool
    no_negatives = {**dialogue(6, [T("show me red")], [T("here red"), M(KR)], neg_keys=()),
                    "negative_candidate_texts": []}
    one_image = dialogue(7, [T("show me red")], [T("here red"), M(KR)], neg_keys=(KB,))
    one_text = {**dialogue(8, [T("show me red")], [T("here red"), M(KR)]),
                "negative_candidate_texts": ["blue thing", "  "]}  # the empty one is dropped
    root = write_mmdialog(tmp_path / "MMDialog", [*MM_DIALOGUES, no_negatives, one_image, one_text])
    res = evaluate_mmdialog(mm_stub(), root, n_negatives=MM_NEG)
    reference = evaluate_mmdialog(mm_stub(), write_mmdialog(tmp_path / "ref"), n_negatives=MM_NEG)
    assert res["metrics"] == reference["metrics"]  # as if those dialogues were not there
    c = res["counts"]
    assert c["skipped_queries"] == {"empty_target_turn": 1, "missing_target_image": 1,
                                    "no_negative_images": 1, "too_few_negative_images": 1,
                                    "too_few_negative_texts": 1}
    assert c["queries_evaluated"] == 3 and c["queries_skipped"] == 5
    assert res["settings"]["n_negatives"] == MM_NEG and "fewer than 2 scorable negatives" in res["settings"]["pool"]
    table = format_table(res)
    assert "3 queries evaluated, 5 skipped" in table
    assert ("skipped: empty_target_turn 1, missing_target_image 1, no_negative_images 1, "
            "too_few_negative_images 1, too_few_negative_texts 1 (full pool: 2 negatives per modality)") in table

    # without a text retrieval space only the image pool counts
    images_only = evaluate_mmdialog(mm_stub(supports_text=False), root, n_negatives=MM_NEG)
    assert images_only["counts"]["queries_evaluated"] == 4
    assert "too_few_negative_texts" not in images_only["counts"]["skipped_queries"]
    # the protocol's default (999) on a small set: nothing is scored, and the error says why
    with pytest.raises(ValueError, match=r"smaller than 999 negatives per modality.*--n-negatives"):
        evaluate_mmdialog(mm_stub(), root)
    with pytest.raises(ValueError, match="n_negatives must be >= 1"):
        evaluate_mmdialog(mm_stub(), root, n_negatives=0)


def test_mmdialog_without_text_space_reports_images_only(tmp_path):
    stub = mm_stub(supports_text=False)
    res = evaluate_mmdialog(stub, write_mmdialog(tmp_path / "MMDialog"), n_negatives=MM_NEG)
    m = res["metrics"]
    assert m["text"] is None and m["overall"] is None and m["cross_modal_consistency"] is None
    assert_metrics(m["image"], 100 / 3, 100, 100, (1 + 1 / 2 + 1 / 3) / 3, 2.0, 3)
    assert m["image_retrieval_rate"] == 1.0
    assert any("image metrics only" in n for n in res["notes"])
    assert not stub.text_calls
    table = format_table(res)
    assert "image metrics only" in table and "text" in table


def test_outputs_table_json_png(tmp_path):
    vd = evaluate_visdial(vd_stub(), write_visdial(tmp_path / "VisualDialog"))
    mm = evaluate_mmdialog(mm_stub(supports_text=False), write_mmdialog(tmp_path / "MMDialog"), n_negatives=MM_NEG)
    table = format_table([vd, mm])
    assert "dialogue->image" in table and "50.00" in table and "0.6875" in table
    out = write_results(mm, tmp_path / "out" / "mm.json")

    def no_nan(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(out.read_text(), parse_constant=no_nan)
    assert data["metrics"]["text"] is None and data["benchmark"] == "mmdialog"
    png = save_examples_png(vd, tmp_path / "vd.png")  # files are not real JPEGs: placeholders
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# End to end: synthetic data, a random-init tiny model folder, both scripts
# ----------------------------------------------------------------------------------------------

N_VISDIAL, N_MMDIALOG, N_NEGATIVES = 8, 6, 20


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_model_config, tiny_backbones):
    from unimur.data.synthetic.generator import generate
    from unimur.model.model import UniMuR
    from unimur.model.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    model = UniMuR(tiny_model_config, *tiny_backbones)
    save_pretrained(model.config, model.trainable_state_dict(), model.tokenizer, model.ret_id,
                    root / "unimur_model")
    paths = generate(root / "data", seed=0, n_train=0, n_val=0, n_visdial=N_VISDIAL,
                     n_mmdialog=N_MMDIALOG, n_negatives=N_NEGATIVES, image_size=32)
    return root, paths, model


def check_recalls(metrics):
    for k in ("R@1", "R@5", "R@10"):
        assert 0 <= metrics[k] <= 100
    assert 0 < metrics["MRR"] <= 1 and metrics["mean_rank"] >= 1


def test_eval_visdial_script(e2e, tmp_path):
    from unimur.commands import eval_visdial

    root, paths, _ = e2e
    out, png = tmp_path / "visdial.json", tmp_path / "visdial.png"
    res = eval_visdial.main(["--model-dir", str(root / "unimur_model"), "--visdial-dir",
                             str(paths["visdial_dir"]), "--output", str(out), "--examples-png",
                             str(png), "--device", "cpu", "--batch-size", "4", "--no-progress"])
    data = json.loads(out.read_text())
    assert {"benchmark", "settings", "metrics", "counts", "timing", "examples", "model"} <= set(data)
    assert data["counts"]["dialogues_evaluated"] == N_VISDIAL == res["counts"]["dialogues_evaluated"]
    for direction in ("dialogue_to_image", "image_to_dialogue"):
        check_recalls(data["metrics"][direction])
        assert data["metrics"][direction]["R@10"] == 100  # pool of 8
    assert data["model"]["method"] == "unimur" and data["settings"]["rounds"] == 10
    assert png.stat().st_size > 1000


def test_eval_mmdialog_script(e2e, tmp_path):
    from unimur.commands import eval_mmdialog
    from unimur.inference.embedder import ModelEmbedder

    root, paths, model = e2e
    args = ["--model-dir", str(root / "unimur_model"), "--mmdialog-dir", str(paths["mmdialog_dir"]),
            "--device", "cpu", "--no-progress", "--n-negatives", str(N_NEGATIVES)]
    out, png = tmp_path / "mmdialog.json", tmp_path / "mmdialog.png"
    res = eval_mmdialog.main(args + ["--output", str(out), "--examples-png", str(png)])
    data = json.loads(out.read_text())
    assert data["counts"]["queries_evaluated"] == N_MMDIALOG and data["counts"]["queries_skipped"] == 0
    for modality in ("text", "image", "overall"):
        check_recalls(data["metrics"][modality])
    assert data["metrics"]["image_retrieval_rate"] == 1.0
    assert -1 <= data["metrics"]["cross_modal_consistency"] <= 1
    assert data["counts"]["pool_sizes"]["text"]["min"] >= 20
    assert png.stat().st_size > 1000

    # precomputed embeddings (what extract_vis_emb.py writes) give the same numbers
    keys = sorted(p.stem for p in (paths["mmdialog_dir"] / "test").glob("*.jpg"))
    emb, _ = ModelEmbedder(model, progress=False).embed_images(
        [paths["mmdialog_dir"] / "test" / f"{k}.jpg" for k in keys], ids=keys)
    save_image_embeddings(emb, tmp_path / "emb.safetensors")
    res2 = eval_mmdialog.main(args + ["--embeddings", str(tmp_path / "emb.safetensors")])
    for modality in ("text", "image", "overall"):
        assert res2["metrics"][modality]["MRR"] == pytest.approx(res["metrics"][modality]["MRR"], abs=1e-6)
    # a file without the model's digest (like a converted FROMAGe pickle) is evaluated, and says so
    check = res2["settings"]["embeddings_check"]
    assert check["status"] == "unchecked" and check["file_weights_sha256"] is None
    assert any("records no model digest" in n for n in res2["notes"])


def other_model_dir(e2e, tmp_path) -> Path:
    """The e2e model with other trainable weights (same architecture and embedding size)."""
    from unimur.model.pretrained import save_pretrained

    _, _, model = e2e
    state = {k: v + 0.5 for k, v in model.trainable_state_dict().items()}
    return save_pretrained(model.config, state, model.tokenizer, model.ret_id, tmp_path / "other_model")


def test_embeddings_of_another_model_are_refused_unless_allowed(e2e, tmp_path, capsys, monkeypatch):
    from unimur.commands import eval_mmdialog
    from unimur.errors import run_cli
    from unimur.inference.extract import extract, list_images

    root, paths, _ = e2e
    model_dir, other = root / "unimur_model", other_model_dir(e2e, tmp_path)
    ids, files = list_images(image_dir=paths["mmdialog_dir"] / "test")
    emb = extract(other, ids, files, tmp_path / "other_emb.safetensors")  # what extract_vis_emb.py writes
    args = ["--model-dir", str(model_dir), "--mmdialog-dir", str(paths["mmdialog_dir"]), "--device", "cpu",
            "--no-progress", "--n-negatives", str(N_NEGATIVES), "--embeddings", str(emb)]
    capsys.readouterr()
    with monkeypatch.context() as m:  # refused before the model is loaded
        m.setattr(eval_mmdialog, "load_embedder", lambda *a, **k: pytest.fail("model loaded"))
        assert run_cli(eval_mmdialog.main, args) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    digest = json.loads((model_dir / "manifest.json").read_text())["weights_sha256"]
    other_digest = json.loads((other / "manifest.json").read_text())["weights_sha256"]
    assert line == (f"error: {emb} was extracted with another model (weights sha256 {other_digest[:12]}...) "
                    f"than {model_dir} ({digest[:12]}...): its image embeddings are not this model's; "
                    f"re-extract them with `python unimur/extract_vis_emb.py --model-dir {model_dir} ...`, "
                    f"omit --embeddings to embed the images now, or pass --allow-embeddings-mismatch to "
                    f"evaluate anyway (recorded in the results)")

    out = tmp_path / "allowed.json"
    eval_mmdialog.main([*args, "--allow-embeddings-mismatch", "--output", str(out)])
    check = json.loads(out.read_text())["settings"]["embeddings_check"]
    assert check == {"file_weights_sha256": other_digest, "model_weights_sha256": digest,
                     "allow_mismatch": True, "status": "mismatch_allowed", "note": check["note"]}
    assert check["note"] in json.loads(out.read_text())["notes"]

    # the model's own extraction passes the check
    own = extract(model_dir, ids, files, tmp_path / "own_emb.safetensors")
    res = eval_mmdialog.main([*args[:-1], str(own)])
    assert res["settings"]["embeddings_check"]["status"] == "match"


def test_eval_scripts_read_their_data_before_loading_the_model(e2e, tmp_path, capsys, monkeypatch):
    import shutil

    from unimur.commands import eval_mmdialog, eval_visdial
    from unimur.errors import run_cli

    root, paths, _ = e2e

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(eval_visdial, "load_embedder", no_model)
    monkeypatch.setattr(eval_mmdialog, "load_embedder", no_model)
    vd = tmp_path / "VisualDialog"
    shutil.copytree(paths["visdial_dir"], vd)
    (vd / "visdial_1.0_val.json").write_text(paths["visdial_json"].read_text()[:300])
    assert run_cli(eval_visdial.main, ["--model-dir", str(root / "unimur_model"), "--visdial-dir", str(vd)]) == 1
    assert "visdial_1.0_val.json" in capsys.readouterr().err
    mm = tmp_path / "MMDialog"
    (mm / "test").mkdir(parents=True)
    (mm / "test" / "conversations.json").write_text(paths["mmdialog_json"].read_text()[:300])
    assert run_cli(eval_mmdialog.main, ["--model-dir", str(root / "unimur_model"), "--mmdialog-dir", str(mm)]) == 1
    assert "truncated or malformed JSON array" in capsys.readouterr().err


def test_fromage_model_reports_images_only(e2e, tiny_backbones):
    from unimur.config import ModelConfig
    from unimur.inference.embedder import ModelEmbedder
    from unimur.model.model import UniMuR

    _, paths, _ = e2e
    config = ModelConfig(method="fromage", target_proj="linear", llm="tiny-opt", visual_model="tiny-clip")
    embedder = ModelEmbedder(UniMuR(config, *tiny_backbones), progress=False)
    res = evaluate_mmdialog(embedder, paths["mmdialog_dir"], n_negatives=N_NEGATIVES)
    assert res["metrics"]["text"] is None and res["metrics"]["overall"] is None
    check_recalls(res["metrics"]["image"])
    assert not math.isnan(res["metrics"]["image_retrieval_rate"])
    vd = evaluate_visdial(embedder, paths["visdial_dir"])
    check_recalls(vd["metrics"]["dialogue_to_image"])


def test_scripts_fail_clearly_without_data(tmp_path, capsys):
    from unimur.commands import eval_mmdialog, eval_visdial
    from unimur.errors import run_cli

    assert run_cli(eval_visdial.main, ["--visdial-dir", str(tmp_path / "nope")]) == 1
    assert "VisDial annotation file not found" in capsys.readouterr().err
    write_mmdialog(tmp_path / "MMDialog")
    assert run_cli(eval_mmdialog.main, ["--mmdialog-dir", str(tmp_path / "MMDialog"),
                                        "--model-dir", str(tmp_path / "no_model")]) == 1
    assert "not a pruned UniMuR model folder" in capsys.readouterr().err


def test_mmdialog_negatives_equal_to_the_answer_or_repeated_do_not_fill_the_pool(tmp_path):
    # every negative equals the answer: after removing them the pool is the answer alone, a free hit
    all_gt = {**dialogue(6, [T("show me red")], [T("here red"), M(KR)], neg_keys=(KR, KR)),
              "negative_candidate_texts": ["here red", "here red"]}
    # one wrong answer repeated: one distinct negative, not two
    repeated = {**dialogue(7, [T("show me red")], [T("here red"), M(KR)], neg_keys=(KB, KB)),
                "negative_candidate_texts": ["blue thing", "blue thing"]}
    root = write_mmdialog(tmp_path / "MMDialog", [*MM_DIALOGUES, all_gt, repeated])
    res = evaluate_mmdialog(mm_stub(), root, n_negatives=MM_NEG)
    reference = evaluate_mmdialog(mm_stub(), write_mmdialog(tmp_path / "ref"), n_negatives=MM_NEG)
    assert res["metrics"] == reference["metrics"]  # neither dialogue is scored
    c = res["counts"]
    assert c["skipped_queries"] == {"empty_target_turn": 1, "missing_target_image": 1,
                                    "no_negative_images": 1, "too_few_negative_images": 1}
    assert c["queries_evaluated"] == 3 and "distinct negatives" in res["settings"]["pool"]


def test_mmdialog_duplicate_gt_elements_and_dialogues_are_scored_once_and_counted(tmp_path):
    twice = dialogue(1, [T("show me red")], [T("here red"), T("here red"), M(KR), M(KR)], neg_keys=(KB, KMISS, KG))
    root = write_mmdialog(tmp_path / "MMDialog", [twice, D_B, D_C, D_EMPTY, D_NO_TARGET, D_C])
    res = evaluate_mmdialog(mm_stub(), root, n_negatives=MM_NEG)
    reference = evaluate_mmdialog(mm_stub(), write_mmdialog(tmp_path / "ref"), n_negatives=MM_NEG)
    assert res["metrics"] == reference["metrics"]
    c = res["counts"]
    assert c["skipped_dialogues"] == {"duplicate_dialogue": 1}
    assert c["dropped_elements"]["duplicate_gt_text"] == 1 and c["dropped_elements"]["duplicate_gt_image"] == 1
    assert c["queries_evaluated"] == 3 and c["gt_texts"] == 3 and c["gt_images"] == 3
