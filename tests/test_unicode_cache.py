import numpy as np

from palm.kernels import bpe


def test_the_unicode_class_table_cache_is_keyed_by_the_code_that_builds_it(tmp_path, monkeypatch):
    """The cached table is used while the classifier is unchanged, and not once its code changes."""
    monkeypatch.setenv("PALM_CACHE", str(tmp_path))
    build = bpe.unicode_classes.__wrapped__  # without the in-process functools cache
    table = build()
    (cached,) = tmp_path.glob("unicode-classes-*.npy")
    sentinel = np.full_like(table, 7)
    np.save(cached, sentinel)
    assert (build() == 7).all()  # read back from the cache, not rebuilt

    real_getsource = bpe.inspect.getsource
    monkeypatch.setattr(bpe.inspect, "getsource", lambda f: real_getsource(f) + "# an edit\n")
    assert np.array_equal(build(), table)  # an edit to the classifier: rebuilt, the stale table ignored
    assert len(list(tmp_path.glob("unicode-classes-*.npy"))) == 2
