"""Data: formats, loss masking, held-out split, partitions, batching, tokenisation cache."""
import json
import os

import numpy as np
import pytest
import torch

from hsplit.planner.errors import ConfigError
from hsplit.planner.plan import DataSpec
from hsplit.runtime.data.federated import load_federated_data, partition, shakespeare_root
from hsplit.runtime.data.source import inspect, resolve
from hsplit.runtime.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    old = os.environ.get("HSPLIT_CACHE")
    os.environ["HSPLIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))   # shared: tokenise once per module
    yield
    if old is None:
        os.environ.pop("HSPLIT_CACHE", None)
    else:
        os.environ["HSPLIT_CACHE"] = old


def _rows(ts):
    return {tuple(r.tolist()) for r in ts.input_ids}


def test_shakespeare_by_source_gives_each_client_whole_genres_and_a_disjoint_eval_split(tok):
    genres = sorted(p.name for p in shakespeare_root().iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert len(genres) == 6
    d = load_federated_data(DataSpec(), tok, 64, [1.0, 1.0, 1.0], seed=0)
    assert sorted(g for srcs in d.client_sources for g in srcs) == genres       # every genre used once
    assert all(len(s) >= 1 for s in d.client_sources)
    sizes = [len(c) for c in d.clients]
    assert max(sizes) < 1.6 * min(sizes)                                        # balanced by size
    train = set().union(*(_rows(c) for c in d.clients))
    assert not (_rows(d.eval) & train) and len(d.eval) > 0                      # no client trains on eval
    assert d.summary["format"] == "shakespeare"


def test_e2e_csv_puts_the_loss_on_the_reference_only(tok, tmp_path):
    f = tmp_path / "e2e.csv"
    f.write_text("mr,ref\n" + ('"name[Eagle], food[French]","The Eagle serves French food."\n'
                                '"name[Mill], food[Thai]","The Mill serves Thai food."\n') * 10)
    spec = DataSpec(path=str(f))
    assert inspect(resolve(spec), spec).kind == "e2e"
    d = load_federated_data(DataSpec(path=str(f), partition="iid", eval_fraction=0.1), tok, 32, [1, 1], 0)
    ts = d.clients[0]
    for i in range(len(ts)):
        ids, lab, mask = ts.input_ids[i], ts.labels[i], ts.attention_mask[i]
        text = tok.decode(ids[mask == 1])
        target = tok.decode(lab[lab != -100])
        assert text.startswith("name[") and "serves" in target and "name[" not in target
        assert (lab[mask == 0] == -100).all()


@pytest.mark.parametrize("names, per_name", [(400, 1), (150, 2), (5, 80)])
def test_the_eval_split_is_about_eval_fraction_however_small_the_sources(tok, tmp_path, names, per_name):
    """E2E's source is the restaurant name: 400 one-reference names once gave an empty eval split (each
    source rounded 0.1 x 1 to 0), and 150 two-reference names a 50 % one (each source held out >= 1)."""
    f = tmp_path / "e2e.csv"
    rows = [f'"name[R{i}]","{j} R{i}."' for i in range(names) for j in range(per_name)]
    f.write_text("mr,ref\n" + "\n".join(rows) + "\n")
    d = load_federated_data(DataSpec(path=str(f), partition="iid", eval_fraction=0.1), tok, 32, [1, 1], 0)
    total = names * per_name
    assert abs(len(d.eval) - 0.1 * total) <= 5, (len(d.eval), total)
    assert len(d.eval) + sum(len(c) for c in d.clients) == total
    train = set().union(*(_rows(c) for c in d.clients))
    assert not (_rows(d.eval) & train)                                          # disjoint
    again = load_federated_data(DataSpec(path=str(f), partition="iid", eval_fraction=0.1), tok, 32, [1, 1], 0)
    assert torch.equal(again.eval.input_ids, d.eval.input_ids)                  # a function of the seed


def test_jsonl_prompt_completion_and_text_and_errors(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": "Q: two plus two?", "completion": " four", "source": s})
                           for s in ["a", "b"] * 10) + "\n")
    d = load_federated_data(DataSpec(path=str(f), partition="by-source"), tok, 24, [1, 1], 0)
    assert d.client_sources == [["a"], ["b"]]
    lab = d.clients[0].labels[0]
    assert tok.decode(lab[lab != -100]).startswith(" four")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    with pytest.raises(ConfigError, match="unknown record fields: found question; hsplit reads messages"):
        load_federated_data(DataSpec(path=str(bad)), tok, 24, [1], 0)
    with pytest.raises(ConfigError, match="no such file"):
        load_federated_data(DataSpec(path=str(tmp_path / "missing.txt")), tok, 24, [1], 0)
    txt = tmp_path / "t.txt"
    txt.write_text("All the world's a stage. " * 200)
    d = load_federated_data(DataSpec(path=str(txt), partition="iid"), tok, 16, [1, 3], 0)
    assert len(d.clients[1]) == pytest.approx(3 * len(d.clients[0]), rel=0.1)      # iid follows data weights
    assert (d.clients[0].labels == d.clients[0].input_ids).all()


def test_partitions_are_deterministic_and_cover_every_item_once():
    sizes = {"a": 50, "b": 30, "c": 20}
    for how in ("by-source", "iid", "dirichlet"):
        p1 = partition(sizes, [1, 1, 1, 1], how, 0.5, seed=3)
        p2 = partition(sizes, [1, 1, 1, 1], how, 0.5, seed=3)
        assert all(x.keys() == y.keys() and all(np.array_equal(x[s], y[s]) for s in x) for x, y in zip(p1, p2))
        for s, n in sizes.items():
            got = np.sort(np.concatenate([c[s] for c in p1 if s in c]))
            assert np.array_equal(got, np.arange(n)), how
    # fewer sources than clients: sources are shared
    p = partition({"a": 10}, [1, 1, 1], "by-source", 0.5, 0)
    assert [len(c["a"]) for c in p] == [4, 3, 3]
    # dirichlet with small alpha is skewed
    p = partition({"a": 1000, "b": 1000}, [1, 1], "dirichlet", 0.05, 0)
    shares = [len(p[0].get(s, [])) / 1000 for s in ("a", "b")]
    assert any(abs(x - 0.5) > 0.3 for x in shares)


def test_batches_are_a_pure_function_of_seed_round_client_step(tok):
    d = load_federated_data(DataSpec(), tok, 64, [1, 1], seed=0)
    c = d.clients[0]
    b1, b2 = c.batch(4, 0, 1, 0, 5), c.batch(4, 0, 1, 0, 5)
    assert torch.equal(b1.input_ids, b2.input_ids)
    assert not torch.equal(b1.input_ids, c.batch(4, 0, 1, 0, 6).input_ids)
    assert not torch.equal(b1.input_ids, c.batch(4, 0, 2, 0, 5).input_ids)
    # one round covers a client's data without repeats until it wraps
    n = len(c)
    seen = torch.cat([c.batch(8, 0, 0, 0, s).input_ids for s in range(min(n // 8, 20))])
    assert len(_rows(type(c)(seen, seen, seen))) == seen.shape[0]


class _NoEncoding:
    """The tokenizer, except that encoding text fails: what a cached tokenisation never does."""
    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *a, **k):
        raise AssertionError("tokenised again")


def test_tokenisation_is_cached_by_datasets_and_redone_when_the_file_changes(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HSPLIT_CACHE", str(tmp_path / "cache"))
    spec = DataSpec(path="shakespeare")
    first = load_federated_data(spec, tok, 48, [1], 0)
    files = list((tmp_path / "cache" / "tokens").glob("*.arrow"))
    assert len(files) == 1
    d = load_federated_data(spec, _NoEncoding(tok), 48, [1], 0)          # from the cache: no encoding
    assert torch.equal(d.clients[0].input_ids, first.clients[0].input_ids)
    assert len(load_federated_data(spec, _NoEncoding(tok), 32, [1], 0).clients[0]) > 0   # seq_len: not in the key
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(20)))
    load_federated_data(DataSpec(path=str(f), partition="iid"), tok, 16, [1], 0)
    load_federated_data(DataSpec(path=str(f), partition="iid"), _NoEncoding(tok), 16, [1], 0)
    f.write_text("".join(json.dumps({"text": f"other line {i}"}) + "\n" for i in range(21)))
    with pytest.raises(AssertionError, match="tokenised again"):
        load_federated_data(DataSpec(path=str(f), partition="iid"), _NoEncoding(tok), 16, [1], 0)
