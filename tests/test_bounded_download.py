"""hsplitlora's bounded download (`aggregation: bounded`): the server's global model stays exactly
W_0 + the p-weighted aggregate of every holder's update; each client is sent a rank-(q + floor_rank)
truncation T of what its blocks lack and keeps the rest owed (error feedback). Pinned here on a tiny
model: exactness at the server, a client's own copy (its weights + every T it received) equals the
in-process representation (global - s B A - owed), the bytes sent, resume, sampling and re-planning.
(Distributed equality: tests/test_distributed.py; the planner's charge: tests/test_merge_download.py.)"""
from pathlib import Path

import pytest
import torch
from conftest import tiny_runtime_env

from hsplit.planner.plan import Plan
from hsplit.runtime.train import checkpoint
from hsplit.runtime.train.loop import InProcess, Silent, run
from hsplit.runtime.train.options import RunOptions
from hsplit.runtime.train.simulation import build
from hsplit.runtime.strategies.base import on_blocks
from hsplit.runtime.strategies.hsplitlora import basis, truncated

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_runtime_env(tmp_path_factory, "bounded")


CLIENTS = [{"id": "a", "device": "pi", "split_layer": 1, "ranks": {"q_proj": 2}, "data_weight": 1.0},
           {"id": "b", "device": "jetson", "split_layer": 3,
            "ranks": {"q_proj": 8, "model.layers.1.mlp.down_proj": 4}, "data_weight": 2.0},
           {"id": "c", "device": "laptop", "split_layer": 2, "ranks": {"v_proj": 4}, "data_weight": 0.5}]


def make_plan(env, name, rounds=2, download=None, clients=CLIENTS, **extra):
    root, model, text = env
    t = {"batch_size": 2, "seq_len": 32, "local_steps": 3, "rounds": rounds, "dtype": "fp32", "learning_rate": 2e-2,
         "warmup_steps": 0, "seed": 0, "lora_dropout": 0.1, "max_grad_norm": 1.0, "lr_schedule": "constant"}
    plan = Plan.from_dict({"model": str(model), "strategy": "hsplitlora", "server_rank": 4, "aggregation": "bounded",
                           "ranks_allowed": [0, 2, 4, 8], "modules": ["q_proj", "v_proj", "down_proj"], "training": t,
                           **({"download": download} if download is not None else {}),
                           "data": {"path": str(text), "partition": "by-source", "eval_fraction": 0.1},
                           "clients": clients, **extra}, name)
    plan.save(Path(root) / name)
    return Path(root) / name


def d64(x):
    return x.detach().double()


def own_base(sim, p):
    """Party p's base on every matrix of its offset: shared base + s x offset (fp64)."""
    s = sim.training.lora_alpha_over_rank
    return {m: d64(sim.bank.base_weight(m)) + s * d64(ob) @ d64(oa)
            for m, (oa, ob) in sim.bank.factors(sim.strategy.offset(p)).items()}


def test_the_server_model_is_exact_and_a_client_copy_plus_its_downloads_is_its_base(env):
    """W' = W + sum_h p_h s (B_h' A_h' - B_h^0 A_h^0) exactly, every round; a client that adds each T it is sent
    (and its own s (B' A' - B^0 A^0)) to its own copy of its blocks holds exactly the base the server tracks for
    it (global - s B' A' - owed), with nothing dropped (owed_rank large enough for the tiny matrices)."""
    sim = build(Plan.load(make_plan(env, "exact.yaml", download={"floor_rank": 2, "owed_rank": 64})),
                progress=False, device="cpu")
    ex = InProcess(sim, None)
    s = sim.training.lora_alpha_over_rank
    copies = {p.adapter: {m: w for m, w in own_base(sim, p).items() if on_blocks(m, p.split)} for p in sim.parties}
    for r in range(3):
        start = {p.adapter: {m: (d64(a), d64(b)) for m, (a, b) in sim.bank.factors(p.adapter).items()}
                 for p in sim.parties}
        w0 = {m: d64(sim.bank.base_weight(m)) for m in sim.strategy.adapted()}
        rows = ex.train_round(r, Silent())
        update, rows = ex.aggregate(r, rows)
        for m, w in w0.items():
            want = w.clone()
            holders = [p for p in sim.parties if m in p.ranks]
            total = sum(p.weight for p in holders)
            for p in holders:
                a, b = sim.bank.factors(p.adapter)[m]
                a0, b0 = start[p.adapter][m]
                want += p.weight / total * s * (d64(b) @ d64(a) - b0 @ a0)
            torch.testing.assert_close(d64(sim.bank.base_weight(m)), want, rtol=0, atol=2e-6)
        for p, row in zip(sim.parties, rows):
            sent = update.download[p.adapter]
            assert row["owed_dropped"] == pytest.approx(0, abs=1e-9)
            assert sim.strategy.traffic(p, update)[1] == sum(4 * (b.numel() + a.numel()) for b, a in sent.values()) > 0
            for m, copy in copies[p.adapter].items():
                q = p.ranks.get(m, 0)
                tb, ta = sent[m]
                assert tb.shape[1] == ta.shape[0] == max(q, 2)     # rank max(q, floor_rank), always
                copy += d64(tb) @ d64(ta)          # its base moves by what it is sent, nothing else
                torch.testing.assert_close(copy, own_base(sim, p)[m], rtol=0, atol=5e-6)
    # something is owed: the download is smaller than what the blocks lacked
    owed = [ob[:, p.ranks.get(m, 0):].abs().max() for p in sim.parties
            for m, (oa, ob) in sim.bank.factors(sim.strategy.offset(p)).items() if on_blocks(m, p.split)]
    assert max(owed) > 1e-4


def test_the_download_is_the_best_rank_r_truncation_and_the_rest_is_owed():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 12, generator=g), torch.randn(12, 30, generator=g)
    (tb, ta), (ob, oa), rest = truncated(b, a, 3, 4)
    d = (b @ a).double()
    u, sv, vh = torch.linalg.svd(d)
    best = (u[:, :3] * sv[:3]) @ vh[:3]
    torch.testing.assert_close((tb @ ta).double(), best, rtol=0, atol=1e-4)
    torch.testing.assert_close((ob @ oa).double(), (u[:, 3:7] * sv[3:7]) @ vh[3:7], rtol=0, atol=1e-4)
    assert rest == pytest.approx(float((sv[7:] ** 2).sum()), rel=1e-6)
    (tb, ta), _, rest = truncated(b[:, :2], a[:2], 5, 0)      # fewer components than asked: zero-padded
    assert tb.shape == (40, 5) and ta.shape == (5, 30) and rest == pytest.approx(0, abs=1e-9)
    torch.testing.assert_close(tb @ ta, b[:, :2] @ a[:2], rtol=0, atol=1e-4)


@pytest.mark.parametrize("d_out, d_in, k", [(40, 30, 5), (16, 12, 10)])     # (16, 12): the merge spans it all
def test_extending_the_merges_shared_basis_truncates_exactly_as_the_whole_stack(d_out, d_in, k):
    """settle factors the round's merge once (basis) and extends it by each client's own columns: the same
    T, owed part and dropped norm as truncating the whole stack, including columns already in the merge's span."""
    g = torch.Generator().manual_seed(1)
    mb, ma = torch.randn(d_out, 12, generator=g), torch.randn(12, d_in, generator=g)
    xb, xa = torch.randn(d_out, k, generator=g), torch.randn(k, d_in, generator=g)
    xb[:, 0], xa[0] = mb[:, 3], ma[3]              # a client column that is also in the merge (its own B^0)
    whole = truncated(torch.cat([mb, xb], 1), torch.cat([ma, xa], 0), 3, 4)
    shared = truncated(xb.double(), xa.double(), 3, 4, basis(mb, ma))
    for (wb, wa), (sb, sa) in zip(whole[:2], shared[:2]):
        torch.testing.assert_close(sb @ sa, wb @ wa, rtol=0, atol=1e-4)
    assert shared[2] == pytest.approx(whole[2], rel=1e-6, abs=1e-9)


def test_a_small_owed_rank_drops_the_tail_and_reports_it(env, tmp_path):
    res = run(make_plan(env, "drop.yaml", rounds=2, download={"floor_rank": 2, "owed_rank": 1}),
              RunOptions(runs_dir=tmp_path, name="drop", progress=False, eval_max_seqs=4))
    clients = [r for r in res.rows if r["client"] != "all" and r["round"] == 2]
    assert max(float(r["owed_dropped"]) for r in clients) > 0
    assert "owed_dropped" in (res.run_dir / "metrics.csv").read_text().splitlines()[0]


def test_resume_restores_every_clients_owed_part_exactly(env, tmp_path):
    path = make_plan(env, "resume.yaml", rounds=3)
    full = run(path, RunOptions(runs_dir=tmp_path, name="full", progress=False, eval_max_seqs=4))
    run(path, RunOptions(runs_dir=tmp_path, name="cut", progress=False, eval_max_seqs=4, rounds=1))
    cut = run(path, RunOptions(runs_dir=tmp_path, name="cut", progress=False, eval_max_seqs=4, rounds=3,
                               resume=True))
    _, a = checkpoint.load(full.run_dir, 3)
    _, b = checkpoint.load(cut.run_dir, 3)
    for f in checkpoint.FILES:       # adapters, moments, offsets (owed parts), merges
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            torch.testing.assert_close(a[f][k], b[f][k], rtol=0, atol=1e-6, msg=lambda m: f"{f} {k}: {m}")
    assert any(k.startswith("offset/") for k in a["optimizer.safetensors"])
    assert [r["eval_loss"] for r in full.rows] == pytest.approx([r["eval_loss"] for r in cut.rows], abs=1e-6)


def test_a_client_that_sat_rounds_out_keeps_its_base_and_owes_the_updates_it_missed(env, tmp_path):
    """Sampling: a client drawn again after missing rounds keeps its base (what its copy holds), so it owes
    the merged updates it missed: its owed part grew by them (nothing dropped with owed_rank 64); the server's
    model goes on from every round's merge."""
    from hsplit.runtime.train.partystore import PartyStore
    clients = [dict(c, id=f"{c['id']}{i}") for i in range(2) for c in CLIENTS]
    path = make_plan(env, "sampled.yaml", rounds=4, download={"floor_rank": 2, "owed_rank": 64}, clients=clients,
                     sampling={"clients_per_round": 2})
    sim = build(Plan.load(path), progress=False, device="cpu")
    sim.store = PartyStore(tmp_path / "clients")
    ex = InProcess(sim, None)
    left, returned = {}, 0
    for r in range(6):
        parties = sim.round_parties(r)
        ex.current = parties
        sim.materialise(parties, r)
        for p in parties:
            if p.adapter in left and left[p.adapter][0] < r:
                returned += 1
                base = own_base(sim, p)
                for m, w in left[p.adapter][1].items():
                    torch.testing.assert_close(base[m], w, rtol=0, atol=5e-6)
        rows = ex.train_round(r, Silent())
        update = sim.strategy.combine(parties)
        sim.apply(update, r, parties)
        checkpoint.save(tmp_path, r + 1, sim.tensors(update), {"metrics": []})   # where missed merges are read
        for p in parties:
            left[p.adapter] = (r + 1, {m: w for m, w in own_base(sim, p).items() if on_blocks(m, p.split)})
        sim.release(parties, r + 1)
        del rows
    assert returned > 0


def test_a_sampled_run_resumes_exactly(env, tmp_path):
    clients = [dict(c, id=f"{c['id']}{i}") for i in range(2) for c in CLIENTS]
    path = make_plan(env, "sampled-resume.yaml", rounds=4, clients=clients, sampling={"clients_per_round": 2})
    full = run(path, RunOptions(runs_dir=tmp_path, name="full", progress=False, eval_max_seqs=4))
    run(path, RunOptions(runs_dir=tmp_path, name="cut", progress=False, eval_max_seqs=4, rounds=2))
    cut = run(path, RunOptions(runs_dir=tmp_path, name="cut", progress=False, eval_max_seqs=4, rounds=4,
                               resume=True))
    assert [r["eval_loss"] for r in full.rows] == pytest.approx([r["eval_loss"] for r in cut.rows], abs=1e-6)
    assert [r["bytes_down"] for r in full.rows] == [r["bytes_down"] for r in cut.rows]


def test_replanning_keeps_the_owed_part_and_does_not_change_the_model(env):
    from hsplit.runtime.train.replan import apply_plan
    sim = build(Plan.load(make_plan(env, "move.yaml")), progress=False, device="cpu")
    ex = InProcess(sim, None)
    update, _ = ex.aggregate(0, ex.train_round(0, Silent()))
    before = {p.adapter: own_base(sim, p) for p in sim.parties}
    factors = {p.adapter: {m: (d64(a), d64(b)) for m, (a, b) in sim.bank.factors(p.adapter).items()}
               for p in sim.parties}
    new = Plan.load(make_plan(env, "move-new.yaml"))
    new.clients[1].ranks["q_proj"] = 4
    apply_plan(sim, new, 0, update)
    s = sim.training.lora_alpha_over_rank
    for p in sim.parties:
        after = own_base(sim, p)
        for m, w in before[p.adapter].items():
            if m in after and on_blocks(m, p.split):      # its effective weights on its blocks did not move
                a, b = sim.bank.factors(p.adapter)[m] if m in p.ranks else (None, None)
                eff = after[m] + (s * d64(b) @ d64(a) if a is not None else 0)
                a0, b0 = factors[p.adapter].get(m, (None, None))
                was = w + (s * b0 @ a0 if a0 is not None else 0)
                torch.testing.assert_close(eff, was, rtol=0, atol=1e-6)
    ex.aggregate(1, ex.train_round(1, Silent()))
