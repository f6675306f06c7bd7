"""FROMAGe's inference rules inside the MMDialog evaluation (likelihood text ranking, the
[RET]-generation image rule, overall R@k with missed images) and the attribute consistency,
on the hand-built MMDialog fixture of test_evaluation (every rank known), then end to end."""
import json

import pytest
import torch
from test_evaluation import KB, KG, KG2, KR, MM_NEG, assert_metrics, mm_stub, write_mmdialog

from unimur.evaluation.mmdialog.protocol import evaluate_mmdialog

# scores a FROMAGe-like stub gives each (context keyword, candidate text): higher is likelier
LOGLIK = {("show me red", "here red"): -1.0, ("green please", "green thing"): -0.5,
          ("green please", "green stuff"): -2.0}


class FromageStub:
    """No text space; texts by log-likelihood from LOGLIK (else -10 per token); [RET] by table."""

    supports_text = False

    def __init__(self, ret_flags):
        self.base = mm_stub(supports_text=False)
        self.ret_flags, self.ret_calls = ret_flags, []

    def __getattr__(self, name):
        return getattr(self.base, name)

    def text_log_likelihoods(self, context, candidates):
        # the context's first text, without the prompt's speaker mark; candidates as read after "A:"
        key = next((p for p in context if isinstance(p, str)), "").removeprefix("Q: ").removeprefix("A: ")
        candidates = [c.strip() for c in candidates]
        means = torch.tensor([LOGLIK.get((key, c), -10.0) for c in candidates])
        return means * torch.tensor([len(c.split()) for c in candidates]), means

    def generate_responses(self, contexts, max_tokens=32):
        """The flags of these contexts: the evaluation asks in query order, chunk by chunk."""
        start = sum(n for _, n in self.ret_calls)
        self.ret_calls.append((max_tokens, len(contexts)))
        return fixed_generations(self.ret_flags[start:start + len(contexts)], self.base, contexts)


def fixed_generations(flags, stub, contexts, u=None):
    """Generations with the given [RET] flags; the [RET]'s embedding is the query's own unless
    ``u`` gives one per context."""
    from unimur.inference.generative import Generations

    ret = torch.tensor(flags)
    u = stub.embed_queries(contexts) if u is None else u
    return Generations(ret, torch.where(ret[:, None], u, torch.zeros_like(u)), ["text"] * len(flags))


def test_ret_token_rule_and_overall_counts_missed_images(tmp_path):
    root = write_mmdialog(tmp_path / "MMDialog")
    stub = mm_stub()
    stub.generate_responses = lambda contexts, max_tokens=32: fixed_generations(
        [False, True, True], stub, contexts)  # A, B, C
    res = evaluate_mmdialog(stub, root, n_negatives=MM_NEG, image_rule="ret-token", ret_max_tokens=2)
    m = res["metrics"]
    assert m["image_retrieval_rate"] == pytest.approx(2 / 3)
    # image ranks are the ranking's own (A 1; C 2, 3) ...
    assert_metrics(m["image"], 100 / 3, 100, 100, (1 + 1 / 2 + 1 / 3) / 3, 2.0, 3)
    # ... but overall counts A's image as missed: never a hit (not even at R@5 > its pool of
    # 3), 0 in the MRR, and rank pool size (3) + 1 in the mean rank
    ranks = [1, 3, 1, 4, 2, 3]
    hit_rr = [1, 1 / 3, 1, 0, 1 / 2, 1 / 3]
    assert_metrics(m["overall"], 100 * 2 / 6, 100 * 5 / 6, 100 * 5 / 6, sum(hit_rr) / 6, sum(ranks) / 6, 6)
    assert res["settings"]["image_rule"] == "ret-token" and res["settings"]["ret_max_tokens"] == 2
    # showing an image was right for A and C (their responses hold one), not for B
    q = m["image_output"]
    assert (q["precision"], q["recall"], q["f1"]) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert res["counts"]["consistency_pairs"] == 2  # B (no image gt, but outputs one) and C


def test_likelihood_ranks_texts_of_a_model_without_text_space(tmp_path):
    root = write_mmdialog(tmp_path / "MMDialog")
    res = evaluate_mmdialog(FromageStub([True, False, True]), root, n_negatives=MM_NEG,
                            text_ranking="likelihood", image_rule="ret-token")
    m = res["metrics"]
    # sums (FROMAGe's ranking, metrics.text): A -2 vs -20/-20: 1; B -30 vs -20,-20: 3; C -4 vs
    # -1 (green thing), -20: 2
    assert_metrics(m["text"], 100 / 3, 100, 100, (1 + 1 / 3 + 1 / 2) / 3, 2.0, 3)
    # mean loglik: A "here red" -1 beats negatives (-10): 1; B "more like this" ties the
    # negatives at -10 and ties count against it: 3; C "green stuff" -2 < "green thing" -0.5: 2
    assert_metrics(m["text_mean_loglik"], 100 / 3, 100, 100, (1 + 1 / 3 + 1 / 2) / 3, 2.0, 3)
    assert m["overall"] is not None and m["image_retrieval_rate"] == pytest.approx(2 / 3)
    assert res["settings"]["text_ranking"] == "likelihood"


class Labels:
    media = {KR: {("red", "x")}, KB: {("blue", "x")}, KG: {("green", "x")}, KG2: {("green", "y")}}
    texts = {"here red": ("red", "x"), "blue thing": ("blue", "x"), "green stuff": ("red", "y")}

    def image(self, key):
        return self.media.get(key, set())

    def text(self, text):
        return self.texts.get(text)


def test_attribute_consistency_on_a_hand_built_case(tmp_path):
    res = evaluate_mmdialog(mm_stub(), write_mmdialog(tmp_path / "MMDialog"), n_negatives=MM_NEG,
                            attribute_labels=Labels())
    # top-1 pairs: A (KR, "here red") same object; B (KB, "blue thing") same; C (KG, "green
    # stuff") names a red y, the image shows a green x: not consistent
    assert res["metrics"]["attribute_consistency"] == pytest.approx(2 / 3)
    assert res["counts"]["attribute_consistency_pairs"] == 3


def test_rule_settings_are_checked(tmp_path):
    root = write_mmdialog(tmp_path / "MMDialog")
    with pytest.raises(ValueError, match="threshold"):
        evaluate_mmdialog(mm_stub(), root, n_negatives=MM_NEG, image_rule="threshold")
    with pytest.raises(ValueError, match="image_rule"):
        evaluate_mmdialog(mm_stub(), root, n_negatives=MM_NEG, image_rule="sometimes")


@pytest.fixture(scope="module")
def fromage_model_dir(tmp_path_factory, tiny_backbones):
    from unimur.config import ModelConfig
    from unimur.data.synthetic.generator import generate
    from unimur.model.model import UniMuR
    from unimur.model.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("fromage_e2e")
    torch.manual_seed(0)
    config = ModelConfig(method="fromage", target_proj="linear", llm="tiny-opt", visual_model="tiny-clip")
    model = UniMuR(config, *tiny_backbones)
    save_pretrained(config, model.trainable_state_dict(), model.tokenizer, model.ret_id, root / "model")
    paths = generate(root / "data", seed=0, n_train=0, n_val=0, n_visdial=0, n_mmdialog=6,
                     n_negatives=20, image_size=32)
    return root / "model", paths


def test_fromage_model_fills_every_cell_of_the_mmdialog_table(fromage_model_dir, tmp_path, capsys):
    from unimur.commands import eval_mmdialog

    model_dir, paths = fromage_model_dir
    out = tmp_path / "r.json"
    eval_mmdialog.main(["--model-dir", str(model_dir), "--mmdialog-dir", str(paths["mmdialog_dir"]),
                        "--device", "cpu", "--no-progress", "--n-negatives", "20", "--output", str(out)])
    table = capsys.readouterr().out
    r = json.loads(out.read_text())
    s, m = r["settings"], r["metrics"]
    # a method=fromage model gets FROMAGe's rules by default
    assert (s["text_ranking"], s["image_rule"]) == ("likelihood", "ret-token")
    for key in ("text", "text_mean_loglik", "image", "overall", "overall_mean_loglik"):
        assert m[key] is not None and m[key]["n"] > 0, key
    assert 0 <= m["image_retrieval_rate"] <= 1
    assert s["attribute_labels"].endswith("meta.json")  # the synthetic set's labels were found
    if m["image_retrieval_rate"] > 0:
        assert m["attribute_consistency"] is not None
    assert "text (mean loglik)" in table and "image retrieval rate" in table and "precision" in table
    assert s["prompt_style"] == "dialogue" and s["ret_max_tokens"] == 32
    assert r["examples"][0]["prompt"].endswith("\nA:") and "generated_text" in r["examples"][0]


def test_visdial_ret_token_rule(tmp_path):
    from test_evaluation import vd_stub, write_visdial

    from unimur.evaluation.visdial import evaluate_visdial

    stub = vd_stub()
    stub.generate_responses = lambda contexts, max_tokens=32: fixed_generations(
        [True, False, True, True], stub, contexts)
    res = evaluate_visdial(stub, write_visdial(tmp_path / "VisualDialog"), image_rule="ret-token")
    m = res["metrics"]
    # dialogue->image ranks [1, 1, 2, 4]; dialogue 2 outputs no image: a miss, never a hit
    # (not even at R@5, beyond the pool of 4), 0 in the MRR, rank 4 + 1 in the mean rank
    assert_metrics(m["dialogue_to_image"], 50, 100, 100, 0.6875, 2.0, 4)
    assert_metrics(m["dialogue_to_image_output"], 25, 75, 75, (1 + 0.5 + 0.25) / 4, 3.0, 4)
    assert m["image_retrieval_rate"] == 0.75 and res["settings"]["image_rule"] == "ret-token"


def test_a_dialogue_longer_than_the_llm_positions_is_cut_and_counted(fromage_model_dir, tmp_path, capsys):
    """tiny-opt has 256 positions: a dialogue of ~2,000 tokens loses its oldest turns (counted in
    the results and the table) instead of ending the evaluation; the other queries' results are
    those of the set without it."""
    import shutil

    from unimur.commands import eval_mmdialog

    model_dir, paths = fromage_model_dir
    src = paths["mmdialog_dir"]
    dst = tmp_path / "MMDialog"
    shutil.copytree(src, dst)
    conv = dst / "test" / "conversations.json"
    dialogues = json.loads(conv.read_text())
    long = json.loads(json.dumps(dialogues[0]))
    long["conversation_id"] = 999_999
    filler = [{"turn": [{"__TEXT__": f"turn {i}: " + "a red circle next to a blue square " * 8}]} for i in range(30)]
    long["conversation"] = filler + long["conversation"]
    conv.write_text(json.dumps(dialogues + [long]))

    def run(folder, name):
        out = tmp_path / f"{name}.json"
        eval_mmdialog.main(["--model-dir", str(model_dir), "--mmdialog-dir", str(folder), "--device", "cpu",
                            "--no-progress", "--n-negatives", "20", "--output", str(out)])
        return json.loads(out.read_text()), capsys.readouterr().out

    with_long, table = run(dst, "long")
    plain, _ = run(src, "plain")
    assert with_long["counts"]["contexts_cut"] == 1 and plain["counts"]["contexts_cut"] == 0
    assert "contexts cut to fit 256 positions: 1" in table
    n = plain["counts"]["queries_evaluated"]
    assert with_long["counts"]["queries_evaluated"] == n + 1
    for key in ("image_ranks", "text_ranks", "image_output", "generated_text", "prompt"):
        assert [ex[key] for ex in with_long["examples"][:n]] == [ex[key] for ex in plain["examples"]], key
    cut = with_long["examples"][n]
    assert cut["conversation_id"] == 999_999 and not cut["prompt"].startswith("A: turn 0:")
