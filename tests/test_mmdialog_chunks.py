"""The MMDialog evaluation in chunks of dialogues: the same results whatever the chunk size,
candidate texts embedded per chunk with a bounded cache."""
import pytest
import torch
from test_evaluation import MM_NEG, StubEmbedder, mm_stub, write_mmdialog
from test_fromage_eval import FromageStub, Labels

from unimur.evaluation.mmdialog.protocol import _TextEmbeddingCache, evaluate_mmdialog


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


# A longer set than test_evaluation's: dialogues repeat with new ids, so keys and texts repeat
# across chunks; dialogue 9's only new image (a context image) is unreadable.
def _longer_set():
    from test_evaluation import KBAD, KR, MM_DIALOGUES, M, T, dialogue

    again = [{**d, "conversation_id": 100 + d["conversation_id"]} for d in MM_DIALOGUES]
    bad_context = dialogue(9, [T("show me red"), M(KBAD)], [T("here red"), M(KR)])
    return [MM_DIALOGUES[0], bad_context, *MM_DIALOGUES[1:], *again]


class _StrictStub(StubEmbedder):
    """Like ModelEmbedder: a call in which no image is readable raises NoUsableImages."""

    def embed_images(self, paths, ids=None):
        from pathlib import Path

        from unimur.inference.embedder import NoUsableImages

        readable = [p for p in paths if Path(p).is_file() and not Path(p).read_bytes().startswith(b"BAD")]
        if not readable:
            self.image_calls.append(list(ids))
            raise NoUsableImages("none of the images could be read", {k: "corrupt_image" for k in ids})
        return super().embed_images(paths, ids)


def _strict():
    from test_evaluation import MM_CLIP_TEXTS, MM_IMAGES, MM_KEYWORDS, MM_TEXTS

    return _StrictStub(MM_IMAGES, MM_TEXTS, MM_KEYWORDS, MM_CLIP_TEXTS)


@pytest.mark.parametrize("cache_size", [1, 100_000])
def test_streamed_evaluation_equals_one_chunk(tmp_path, monkeypatch, cache_size):
    """Dialogues read as the chunks need them, images embedded per chunk (with a cache so small
    it re-embeds, or a large one): the results of one chunk over the materialised list."""
    from unimur.data.mmdialog import load_mmdialog
    from unimur.evaluation.mmdialog import chunks as mmdialog_chunks

    root = write_mmdialog(tmp_path / "MMDialog", _longer_set(), container="jsonl")
    kw = dict(n_negatives=MM_NEG, attribute_labels=Labels())
    one = evaluate_mmdialog(_strict(), root, chunk_size=1000, data=load_mmdialog(root), **kw)
    real_init = mmdialog_chunks._ImageEmbeddingCache.__init__
    monkeypatch.setattr(mmdialog_chunks._ImageEmbeddingCache, "__init__",
                        lambda self, *a, **k: real_init(self, *a, **{**k, "max_items": cache_size}))
    stub = _strict()
    streamed = evaluate_mmdialog(stub, root, chunk_size=1, **kw)
    assert one["counts"]["queries_evaluated"] == 7
    assert one["counts"]["unreadable_images"] == {"corrupt_image": 1}  # counted once, not per chunk
    assert one["counts"]["dropped_elements"]["context_image_unreadable"] == 1
    one["counts"].pop("chunk_size"), streamed["counts"].pop("chunk_size")
    for key in ("counts", "examples", "settings", "notes"):
        assert one[key] == streamed[key], key
    for name, value in one["metrics"].items():  # consistency sums may differ in the last bit
        assert streamed["metrics"][name] == (pytest.approx(value) if isinstance(value, float) else value), name
    # each call embeds only keys that chunk needs; the unreadable one is tried once
    calls = [k for call in stub.image_calls for k in call]
    assert calls.count("-77") == 1 and max(len(c) for c in stub.image_calls) <= 5
    if cache_size > 1:  # every readable key embedded once
        assert len(calls) == len(set(calls))


def test_evaluation_pulls_dialogues_per_chunk(tmp_path):
    """The evaluation scores a chunk before it reads the dialogues of the next: when a chunk's
    queries are embedded, the stream has read at most that chunk's dialogues."""
    from unimur.data.mmdialog import MMDialogStream

    root = write_mmdialog(tmp_path / "MMDialog", _longer_set())
    stream = MMDialogStream(root)
    stub = _strict()
    read_at_scoring = []
    embed_queries = stub.embed_queries
    stub.embed_queries = lambda contexts: (read_at_scoring.append((len(contexts), stream.n_dialogues)),
                                           embed_queries(contexts))[1]
    res = evaluate_mmdialog(stub, root, chunk_size=2, n_negatives=MM_NEG, data=stream)
    # 11 dialogues give queries A, 9, B, C, (empty, no target: skipped) A', B', C' (then two
    # skipped): each chunk is scored as soon as its last dialogue is read, none further
    assert [n for n, _ in read_at_scoring] == [2, 2, 2, 1]
    assert [d for _, d in read_at_scoring] == [2, 4, 8, 11]
    assert res["counts"]["queries_evaluated"] == 7
    assert res["counts"]["skipped_queries"] == {"empty_target_turn": 2, "missing_target_image": 2}
