"""Editing objectives of Hase et al. (2023): requests, losses, noise, scores, refusals."""

from __future__ import annotations

import warnings

import pytest
import torch

import editkit
from editkit import EditRequest, Objective
from editkit.errors import InvalidRequestError, UnsupportedObjectiveError
from editkit.eval import METRICS, MetricContext, RecordScores
from editkit.eval.objectives import (
    neighborhood_score,
    objective_probs,
    objective_scores,
    rewrite_score,
)
from editkit.methods._locate.objectives import (
    SubjectNoise,
    noised_distribution,
    replicas,
    resolve_request,
    target_term,
)
from editkit.methods._locate.values import _build_rows, compute_value
from editkit.methods.ft import FT, FTL
from editkit.methods.ft.hparams import FTHyperParams
from editkit.methods.rome import ROME
from editkit.methods.rome.hparams import ROMEHyperParams
from editkit.tokens import score_targets

TEMPLATES = ["{}", "Once upon a time. {}"]
REQUEST = EditRequest("{} plays the sport of", "LeBron James", "football",
                      target_true="basketball", paraphrases=("LeBron James is a player of",),
                      neighborhood=("Michael Jordan plays the sport of",))


def p_of(model, tok, prompt: str, target: str) -> float:
    return float(score_targets(model, tok, [prompt], [target]).exp()[0])


# ------------------------------------------------------------------------- requests
def test_objective_is_part_of_the_request_and_round_trips():
    r = REQUEST.with_objective(Objective("force", noise_std=0.5, samples=3, seed=7))
    assert r.objective.name == "force" and r.optimised_target == "basketball"
    assert EditRequest.from_dict(r.to_dict()) == r
    # the default writes the form every earlier version wrote (patch metadata unchanged)
    assert "objective" not in REQUEST.to_dict()
    assert REQUEST.objective == Objective() and REQUEST.optimised_target == "football"
    assert REQUEST.with_objective("reverse_tracing").optimised_target == "football"
    for name in ("erase", "amplify", "force"):
        assert REQUEST.with_objective(name).optimised_target == "basketball"


@pytest.mark.parametrize("kwargs, needle", [
    ({"objective": "delete"}, "not known"),
    ({"objective": Objective.parse({"name": "force", "samples": 2})}, None),
])
def test_objective_validation(kwargs, needle):
    if needle is None:
        assert EditRequest("{} is", "X", "a", target_true="b", **kwargs).objective.samples == 2
        return
    with pytest.raises(InvalidRequestError, match=needle):
        EditRequest("{} is", "X", "a", target_true="b", **kwargs)


def test_true_target_objectives_need_target_true_and_bad_fields_are_refused():
    with pytest.raises(InvalidRequestError, match="target_true"):
        EditRequest("{} is", "X", "a", objective="erase")
    for bad in ({"samples": 0}, {"noise_std": -1.0}, {"floor": 1.0}, {"seed": 1.5}):
        with pytest.raises(InvalidRequestError):
            Objective("force", **bad)
    with pytest.raises(InvalidRequestError, match="unknown Objective field"):
        Objective.parse({"name": "erase", "thresh": 0.1})


# ------------------------------------------------------------------------- loss terms
def test_target_term_is_the_nll_except_for_erase():
    nll = torch.tensor([0.5, 0.5, 2.0], requires_grad=True)
    same = target_term(nll, [Objective()] * 3)
    assert same is nll  # error injection: the very tensor, bit for bit
    obs = [Objective("amplify"), Objective("erase"), Objective("erase", floor=0.5)]
    term = target_term(nll, obs)
    assert torch.allclose(term[0], nll[0])
    assert torch.allclose(term[1], torch.exp(-nll[1]))
    assert float(term[2].detach()) == 0.0  # p = e⁻² = 0.135 is below the floor: nothing left to do
    term.sum().backward()
    # descending the loss raises the NLL of target_true for erase (gradient −p < 0), lowers
    # it otherwise
    assert nll.grad[0] == 1.0 and nll.grad[1] < 0 and nll.grad[2] == 0


def test_inject_builds_exactly_the_rows_of_the_default_request(gpt2_and_tok):
    _, tok = gpt2_and_tok
    default = _build_rows(tok, [REQUEST], TEMPLATES, "subject_last")
    inject = _build_rows(tok, [REQUEST.with_objective("inject")], TEMPLATES, "subject_last")
    for field in ("seqs", "edit_idx", "read_rows", "read_cols", "target_ids", "target_weight",
                  "plain_row"):
        assert getattr(default, field) == getattr(inject, field)
    force = _build_rows(tok, [REQUEST.with_objective(Objective("force", samples=3))],
                        TEMPLATES, "subject_last")
    assert len(force.seqs) == 3 * len(TEMPLATES) + 1  # 3 noised copies per template + KL
    assert sum(force.target_weight) == pytest.approx(len(TEMPLATES))  # a mean per template


def test_inject_update_is_identical_to_the_default_path(gpt2_and_tok):
    model, tok = gpt2_and_tok
    hp = _rome_hp(model)
    editor = ROME(model, tok, hp, context_templates=TEMPLATES, covariance=torch.eye(192))
    a = editor.compute_update(REQUEST)
    b = editor.compute_update(REQUEST.with_objective(Objective()))
    for name in a.deltas:
        assert torch.equal(a.deltas[name].materialize(), b.deltas[name].materialize())


def _rome_hp(model, steps: int = 8) -> ROMEHyperParams:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = ROMEHyperParams.for_model(model, editkit.get_adapter(model))
    hp.layer = 1
    hp.value.num_grad_steps = steps
    hp.value.early_stop_loss = 0.0
    hp.mom2_adjustment = False
    return hp


@pytest.mark.parametrize("name, target, sign", [
    ("inject", "football", -1), ("amplify", "basketball", -1), ("erase", "basketball", +1),
    ("force", "basketball", -1), ("reverse_tracing", None, -1),
])
def test_value_optimisation_moves_the_objective_in_its_direction(gpt2_and_tok, name, target,
                                                                  sign):
    """v*: the mean NLL of the optimised object goes down (up for erase) over the loop."""
    model, tok = gpt2_and_tok
    adapter = editkit.get_adapter(model)
    r = resolve_request(model, tok, adapter,
                        REQUEST.with_objective(Objective(name, samples=2, noise_std=0.5)))
    if target is not None:
        assert r.optimised_target == target
    hp = _rome_hp(model)
    # only the target term: on a random model p(target_true) ≈ 1e-3, so erasure's gradient
    # (−p) is tiny next to the KL and decay terms; Adam's step follows its sign regardless
    hp.value.kl_factor = hp.value.weight_decay = 0.0
    res = compute_value(model, tok, adapter, hp, r, TEMPLATES)
    change = res.nll[-1] - res.nll[0]
    assert sign * change > 0, (name, res.nll)


def test_force_reads_v0_on_noised_prompts(gpt2_and_tok):
    model, tok = gpt2_and_tok
    adapter = editkit.get_adapter(model)
    hp = _rome_hp(model, steps=1)
    clean = compute_value(model, tok, adapter, hp, REQUEST.with_objective("amplify"), TEMPLATES)
    forced = compute_value(model, tok, adapter, hp,
                           REQUEST.with_objective(Objective("force", noise_std=1.0, samples=2)),
                           TEMPLATES)
    assert not torch.allclose(clean.v0, forced.v0)  # the subject's embeddings were noised
    assert clean.nll[0] != forced.nll[0]


@pytest.mark.parametrize("cls", [FT, FTL])
@pytest.mark.parametrize("name, sign", [("inject", 1), ("erase", -1), ("amplify", 1),
                                        ("force", 1)])
def test_ft_moves_the_objective_in_its_direction(gpt2_and_tok, cls, name, sign):
    model, tok = gpt2_and_tok
    hp = cls.hparams_class(layer=1, lr=5e-2 if cls is FT else 5e-3, num_steps=5,
                           early_stop_loss=0.0, **({} if cls is FT else {"norm_constraint": 5e-2}))
    r = REQUEST.with_objective(Objective(name, noise_std=0.5, samples=2))
    adapter = editkit.get_adapter(model)
    before = objective_probs(model, tok, adapter, r)["rewrite"][0]
    editor = cls(model, tok, hp)
    with editor.applied(r):
        after = objective_probs(model, tok, adapter, r)["rewrite"][0]
    assert sign * (after - before) > 0, (name, before, after)


# ------------------------------------------------------------------------------ noise
def test_subject_noise_is_the_noise_causal_tracing_draws(gpt2_and_tok):
    from editkit.tracing import CausalTracer

    model, tok = gpt2_and_tok
    adapter = editkit.get_adapter(model)
    tracer = CausalTracer(model, tok, noise_std=0.7, samples=3, seed=5)
    tp = tracer.prepare(REQUEST.prompt, REQUEST.subject, "basketball")
    noise = SubjectNoise(model, tok, adapter)
    noise.add(REQUEST.prompt, REQUEST.subject, 0.7, 3, 5)
    (entry,) = [e for d in noise._entries.values() for e in d.values()]
    assert entry.subject_range == tp.subject_range
    assert torch.equal(entry.noise, tp.noise)
    # in a forward: the k-th row of the prompt gets draw k; other prompts stay clean
    emb = adapter.module(model, "embedding")
    ids = tok(REQUEST.text)["input_ids"]
    other = tok("Something else entirely here")["input_ids"]
    width = max(len(ids), len(other))
    batch = torch.tensor([ids + [0] * (width - len(ids))] * 2
                         + [other + [0] * (width - len(other))])
    with torch.no_grad():
        clean = emb(batch)
        with noise.active():
            noisy = emb(batch)
    b, e = tp.subject_range
    assert torch.allclose(noisy[0, b:e] - clean[0, b:e], tp.noise[0])
    assert torch.allclose(noisy[1, b:e] - clean[1, b:e], tp.noise[1])
    assert torch.equal(noisy[2], clean[2]) and torch.equal(noisy[0, e:], clean[0, e:])
    with torch.no_grad():
        assert torch.equal(emb(batch), clean)  # the hook is gone afterwards


def test_tracing_corruption_keeps_its_public_names():
    import editkit.noise as noise
    from editkit.tracing import corruption

    for name in ("make_noise", "embedding_std", "corrupt", "embedding_noise",
                 "subject_token_range", "model_device", "DEFAULT_NOISE", "DEFAULT_SAMPLES",
                 "NOISE_RNGS"):
        assert getattr(corruption, name) is getattr(noise, name)
    assert editkit.tracing.make_noise is noise.make_noise


def test_reverse_tracing_target_is_the_noised_top_word(gpt2_and_tok):
    model, tok = gpt2_and_tok
    adapter = editkit.get_adapter(model)
    r = REQUEST.with_objective(Objective("reverse_tracing", noise_std=0.5, samples=2))
    resolved = resolve_request(model, tok, adapter, r)
    probs = noised_distribution(model, tok, adapter, r)
    word = resolved.target_new
    assert word.strip() and word != r.target_true
    tid = tok(" " + word)["input_ids"][0]
    ranked = torch.argsort(probs, descending=True).tolist()
    assert tid in ranked[:50]
    assert resolve_request(model, tok, adapter, REQUEST) is REQUEST
    assert replicas(r) == 1 and replicas(r.with_objective(Objective("force", samples=4))) == 4


# ------------------------------------------------------------------------------ scores
def test_rewrite_and_neighbourhood_scores():
    assert rewrite_score(0.2, 0.6, "inject") == pytest.approx(0.5)  # half of the way to 1
    assert rewrite_score(0.6, 0.2, "inject") == 0.0  # wrong direction: no credit
    assert rewrite_score(0.8, 0.2, "erase") == pytest.approx(0.75)  # 3/4 of the way to 0
    assert rewrite_score(0.2, 0.8, "erase") == 0.0
    assert rewrite_score(1.0, 1.0, "amplify") == 0.0
    assert neighborhood_score(0.3, 0.3) == 1.0
    assert neighborhood_score(0.3, 1.0) == pytest.approx(1 - 0.7 / 0.7)
    s = objective_scores({"rewrite": [0.2], "paraphrase": [0.2, 0.4], "neighborhood": [0.9]},
                         {"rewrite": [0.6], "paraphrase": [0.6, 0.4], "neighborhood": [0.8]},
                         "amplify")
    assert s["rewrite_score"] == pytest.approx(0.5)
    assert s["paraphrase_score"] == pytest.approx(0.25)
    assert s["neighborhood_score"] == pytest.approx(1 - 0.1 / 0.9)


def test_objective_metrics_are_registered_and_read_the_records_objective():
    import math

    from editkit.eval.datasets import EvalRecord

    rec = EvalRecord("counterfact", 0, 0, REQUEST.with_objective("erase"), raw={})
    pre = RecordScores(logprobs={"rewrite": [[math.log(0.1), math.log(0.8)]]})
    post = RecordScores(logprobs={"rewrite": [[math.log(0.1), math.log(0.2)]]})
    m = METRICS.get("rewrite_score")
    assert m.higher_is_better and "pre" in m.needs
    assert m.compute(post, MetricContext(rec, pre=pre)) == pytest.approx(0.75)
    assert m.compute(post, MetricContext(rec)) is None  # needs the unedited scores
    inject = EvalRecord("counterfact", 0, 0, REQUEST, raw={})
    pre_i = RecordScores(logprobs={"rewrite": [[math.log(0.2), math.log(0.8)]]})
    post_i = RecordScores(logprobs={"rewrite": [[math.log(0.6), math.log(0.3)]]})
    assert m.compute(post_i, MetricContext(inject, pre=pre_i)) == pytest.approx(0.5)
    force = EvalRecord("counterfact", 0, 0, REQUEST.with_objective("force"), raw={})
    assert m.compute(post, MetricContext(force, pre=pre)) is None  # no noised scores given
    for name in ("paraphrase_score", "neighborhood_score"):
        assert name in METRICS
    assert "rewrite_score" not in editkit.eval.default_metrics("counterfact")


# --------------------------------------------------------------------------- refusals
def test_methods_without_objectives_refuse_them(gpt2_and_tok):
    from editkit.methods.ke import KE, KEHyperParams
    from editkit.methods.mend import MEND, MENDHyperParams
    from tests.badinput import Bad, assert_refused

    model, tok = gpt2_and_tok
    from editkit.methods.alphaedit import AlphaEdit

    for cls, hp in ((MEND, MENDHyperParams()), (KE, KEHyperParams()), (AlphaEdit, None)):
        editor = cls(model, tok, hp)
        case = Bad(f"{cls.name}-erase", lambda e=editor: e.apply(REQUEST.with_objective("erase")),
                   UnsupportedObjectiveError, ("erase", cls.name, "rome"))
        assert_refused(case, models=[model])
    # the objectives a method lists are honoured; the default is injection only
    assert ROME.objectives == FT.objectives == FTL.objectives == editkit.get_method(
        "memit").objectives == set(
        editkit.requests.OBJECTIVES)
    assert editkit.Editor.objectives == {"inject"}
    ft = FT(model, tok, FTHyperParams(layer=0, num_steps=1))
    ft.check_objectives([REQUEST.with_objective("force")])  # no error


# ------------------------------------------------------------------- fact-world quality
@pytest.mark.slow
def test_each_objective_moves_the_right_probability_on_the_fact_world():
    """ROME, FT and MEMIT (defaults) edit one fact-world fact under each objective; the
    objective's probability (noised for force) moves the right way, and far."""
    from editkit.testbed import FactWorld, load_fact_world

    torch.set_num_threads(1)
    model, tok = load_fact_world()
    adapter = editkit.get_adapter(model)
    base = EditRequest.from_counterfact(FactWorld().records(n=1)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editors = [ROME(model, tok), FT(model, tok), editkit.get_method("memit")(model, tok)]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    for editor in editors:
        for name in ("inject", "erase", "amplify", "reverse_tracing", "force"):
            r = resolve_request(model, tok, adapter,
                                base.with_objective(Objective(name, samples=3)))
            pre = objective_probs(model, tok, adapter, r, n_neighbors=3)
            with editor.applied(r):
                post = objective_probs(model, tok, adapter, r, n_neighbors=3)
            p0, p1 = pre["rewrite"][0], post["rewrite"][0]
            score = objective_scores(pre, post, name)["rewrite_score"]
            if name == "amplify" and p0 > 0.99:
                assert p1 >= p0 - 1e-3, (editor.name, name, p0, p1)  # nothing to gain
                continue
            print(f"{editor.name:5s} {name:16s} p {p0:.3f} -> {p1:.3f}  score {score:.2f}")
            assert score > 0.3, (editor.name, name, p0, p1)
            assert (p1 < p0) if name == "erase" else (p1 > p0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())


@pytest.mark.parametrize("name, sign", [("inject", -1), ("erase", 1), ("force", -1)])
def test_memit_z_and_keys_follow_the_objective(gpt2_and_tok, name, sign):
    """MEMIT's z (the residual-stream value, slot "block") moves the objective's NLL the
    right way, and for force its keys are the mean over the noise draws of noised keys."""
    from editkit.methods._locate.values import compute_values
    from editkit.methods.memit import MEMIT

    model, tok = gpt2_and_tok
    adapter = editkit.get_adapter(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hp = MEMIT.hparams_class.for_model(model, adapter)
    hp.layers = [0, 1]
    hp.value.num_grad_steps = 8
    hp.value.early_stop_loss = 0.0
    hp.value.kl_factor = hp.value.weight_decay = 0.0
    r = REQUEST.with_objective(Objective(name, noise_std=0.5, samples=2))
    (z,) = compute_values(model, tok, adapter, hp.value, [r], TEMPLATES, layer=1, slot="block")
    assert sign * (z.nll[-1] - z.nll[0]) > 0, (name, z.nll)
    d = model.config.n_inner or 4 * model.config.n_embd
    editor = MEMIT(model, tok, hp, context_templates=TEMPLATES,
                   covariances={0: torch.eye(d), 1: torch.eye(d)})
    plain = editor._keys(1, [REQUEST])
    keys = editor._keys(1, [r])
    if name != "force":
        assert torch.equal(keys, plain)
        return
    from editkit.methods._locate.keys import keys_at
    from editkit.methods._locate.objectives import subject_noise
    from editkit.methods._locate.templates import apply_template

    prompts = [apply_template(t, r.prompt) for t in TEMPLATES]
    with subject_noise(model, tok, adapter, [r], lambda _: prompts):
        noised = editor._keys(1, [r])
        rows = keys_at(model, tok, adapter, 1, [p for p in prompts for _ in range(2)],
                       r.subject)
    assert not torch.allclose(noised, plain)
    expected = rows.view(len(prompts), 2, -1).mean(1)
    groups = editor._template_groups()
    expected = torch.stack([g.mean(0) for g in expected.split(groups)]).mean(0)
    torch.testing.assert_close(noised[:, 0], expected)
