"""The MMDialog evaluation in chunks of dialogues: the same results whatever the chunk size,
candidate texts embedded per chunk with a bounded cache."""
import pytest
import torch

from test_evaluation import MM_NEG, mm_stub, write_mmdialog
from test_fromage_eval import FromageStub, Labels
from unimur.evaluation import evaluate_mmdialog
from unimur.mmdialog_eval import _TextEmbeddingCache


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunks_give_the_same_results_as_one_pass(tmp_path, chunk):
    root = write_mmdialog(tmp_path / "MMDialog")
    kw = dict(n_negatives=MM_NEG, attribute_labels=Labels())
    one, chunked = (evaluate_mmdialog(mm_stub(), root, chunk_size=c, **kw) for c in (64, chunk))
    one["counts"].pop("chunk_size"), chunked["counts"].pop("chunk_size")
    # the negatives repeat across dialogues: the cache embeds each text once either way
    assert one["counts"]["texts_embedded"] == chunked["counts"]["texts_embedded"] == 5
    for key in ("counts", "examples", "settings", "notes"):
        assert one[key] == chunked[key], key
    for name, value in one["metrics"].items():  # consistency sums may differ in the last bit
        assert chunked["metrics"][name] == (pytest.approx(value) if isinstance(value, float) else value), name
    fromage = [evaluate_mmdialog(FromageStub([True, False, True]), root, n_negatives=MM_NEG, chunk_size=c,
                                 text_ranking="likelihood", image_rule="ret-token") for c in (64, chunk)]
    assert fromage[0]["metrics"]["text"] == fromage[1]["metrics"]["text"]
    assert fromage[0]["metrics"]["overall"] == fromage[1]["metrics"]["overall"]
    assert fromage[0]["metrics"]["image_retrieval_rate"] == fromage[1]["metrics"]["image_retrieval_rate"]


def test_text_cache_is_bounded_and_embeds_repeats_once():
    calls = []

    class Texts:
        def embed_texts(self, texts):
            calls.append(list(texts))
            return torch.stack([torch.full((3,), float(len(t))) for t in texts])

    cache = _TextEmbeddingCache(Texts(), max_items=3)
    assert cache.table(["a", "bb", "ccc"])[:, 0].tolist() == [1, 2, 3]
    assert cache.table(["bb", "dddd"])[:, 0].tolist() == [2, 4]   # "bb" from the cache
    assert calls == [["a", "bb", "ccc"], ["dddd"]] and cache.embedded == 4
    assert list(cache.rows) == ["ccc", "bb", "dddd"]              # "a", least recent, evicted
