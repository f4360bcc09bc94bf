"""Planted connectomes and their trajectories across ECT sessions.

FC follows a factor model: parcel ``p`` of network ``n`` loads ``sqrt(w_p)`` on a network
factor (network factors correlated by ``phi``), Salience and FrontoParietal parcels share a
fraction ``rho`` of their loading on a common factor (salience-executive coupling), and each
DMN-DMN bundle adds a factor shared by its two endpoints with loading ``sqrt(kappa * s)``
(structure-function coupling, ``s`` the bundle's normalised strength).  The population
correlation is exact; latent series are drawn from the model and band-limited.

The coupling metric (Pearson r between FC and SC over DMN edges) is concave in ``kappa``
and saturates, so a patient's ``kappa`` is not moved linearly: :func:`calibrate_coupling`
solves, per session, for the ``kappa`` whose population coupling follows the planted
trajectory on the metric's own scale (acute change :data:`COUPLING_ACUTE`, then the
maintenance class's fraction of it), as every other effect does on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.optimize import brentq

DMN, SAL, FPN, VIS = "DefaultMode", "Salience", "FrontoParietal", "Visual"
#: Fraction of the acute (pre -> post) change added at maintenance, per class.
MAINTENANCE_FACTORS = {"regression": -0.7, "stabilisation": 0.0, "continued_remodelling": 0.5}
CLASSES = tuple(MAINTENANCE_FACTORS)
#: Hippocampal expansion scale giving about +4 % hippocampal volume (calibrated on the atlas).
HIPP_SCALE_4PCT = 0.052
#: Planted acute change of the population DMN SC-FC coupling (Pearson r), before jitter;
#: small enough that continued remodelling stays below the model's saturation.
COUPLING_ACUTE = 0.25
BAND_HZ = (0.01, 0.08)


@dataclass(frozen=True)
class GroupDesign:
    """Population parameters shared by all subjects (drawn from the dataset seed)."""

    networks: tuple[str, ...]
    loading: dict[str, float]
    phi: np.ndarray
    class_offset: int


def draw_group_design(rng: np.random.Generator, table: pd.DataFrame) -> GroupDesign:
    """Network loadings (0.3-0.5; 'unassigned' 0.1) and a mild network correlation matrix."""
    networks = tuple(dict.fromkeys(table["network"]))
    loading = {n: float(rng.uniform(0.3, 0.5)) for n in networks}
    if "unassigned" in loading:
        loading["unassigned"] = 0.1
    k = len(networks)
    vecs = rng.normal(0, 0.3, size=(k, 2))
    cov = vecs @ vecs.T + np.eye(k)
    d = np.sqrt(np.diag(cov))
    phi = cov / np.outer(d, d)
    return GroupDesign(networks, loading, phi, int(rng.integers(3)))


@dataclass(frozen=True)
class SubjectEffects:
    """One subject's planted parameters; ``params(role)`` gives a session's values."""

    group: str
    maintenance_class: str | None
    pre: dict[str, float]
    delta: dict[str, float]
    jitter: np.ndarray
    bundle_counts: np.ndarray = field(repr=False)
    #: ``kappa`` per role once :func:`calibrate_coupling` has solved for it.
    kappa_by_role: dict[str, float] | None = None

    def trajectory_factor(self, role: str) -> float:
        """Share of the acute change present at ``role`` (0 pre, 1 post, 1 + class factor)."""
        factor = {"pre": 0.0, "post": 1.0}.get(role)
        if factor is None:
            factor = 1.0 + MAINTENANCE_FACTORS.get(self.maintenance_class or "", 0.0)
        return factor

    def params(self, role: str) -> dict[str, float]:
        """Parameters at ``role`` in ``pre``, ``post``, ``maintenance``."""
        factor = self.trajectory_factor(role)
        out = {k: self.pre[k] + factor * self.delta[k] for k in self.pre}
        if self.kappa_by_role is not None:
            out["kappa"] = self.kappa_by_role[role]
        return out


def draw_subject_effects(
    rng: np.random.Generator, group: str, index: int, design: GroupDesign,
    n_parcels: int, bundle_strength: np.ndarray,
) -> SubjectEffects:
    """Draw a subject's parameters; patients get the planted acute change, controls none."""
    jitter = rng.normal(0, 0.03, n_parcels)
    spread = np.exp(rng.normal(0, 0.1, len(bundle_strength)))
    counts = np.maximum(1, np.round(bundle_strength * spread))
    if group == "patient":
        pre = {"w_dmn": 0.58 + rng.normal(0, 0.03), "rho_se": 0.05, "kappa": 0.05, "hipp": 0.0}
        # delta["kappa"] is the planted change of the population coupling (Pearson r), turned
        # into kappa values by calibrate_coupling
        delta = {"w_dmn": -0.2 * (1 + rng.normal(0, 0.1)), "rho_se": 0.4 * (1 + rng.normal(0, 0.1)),
                 "kappa": COUPLING_ACUTE * (1 + rng.normal(0, 0.1)),
                 "hipp": HIPP_SCALE_4PCT * (1 + rng.normal(0, 0.1))}
        klass = CLASSES[(design.class_offset + index) % len(CLASSES)]
    else:
        pre = {"w_dmn": 0.42 + rng.normal(0, 0.03), "rho_se": 0.05, "kappa": 0.05, "hipp": 0.0}
        delta = dict.fromkeys(pre, 0.0)
        klass = None
    return SubjectEffects(group, klass, pre, delta, jitter, counts.astype(int))


@dataclass(frozen=True)
class FactorModel:
    """``Sigma = L Phi L^T + diag(unique)``; ``population`` is Sigma as a correlation."""

    loadings: np.ndarray
    phi: np.ndarray
    unique: np.ndarray

    @property
    def population(self) -> np.ndarray:
        """The population correlation matrix."""
        cov = self.loadings @ self.phi @ self.loadings.T + np.diag(self.unique)
        d = np.sqrt(np.diag(cov))
        out = cov / np.outer(d, d)
        np.fill_diagonal(out, 1.0)
        return out


def factor_model(
    table: pd.DataFrame, design: GroupDesign, subject: SubjectEffects, params: dict[str, float],
    bundles: pd.DataFrame,
) -> FactorModel:
    """The session's FC factor model (see module docstring)."""
    networks = table["network"].to_numpy()
    n_net = len(design.networks)
    net_idx = np.array([design.networks.index(n) for n in networks])
    w = np.array([design.loading[n] for n in networks]) + subject.jitter
    w[networks == DMN] = params["w_dmn"] + subject.jitter[networks == DMN]
    w = np.clip(w, 0.05, 0.85)
    index_of = {int(v): i for i, v in enumerate(table["index"])}
    dmn_bundles = bundles[(bundles["network_a"] == DMN) & (bundles["network_b"] == DMN)]
    n_fac = n_net + 1 + len(dmn_bundles)
    lam = np.zeros((len(table), n_fac))
    rho = np.clip(params["rho_se"], 0, 1)
    se = np.isin(networks, [SAL, FPN])
    lam[np.arange(len(table)), net_idx] = np.sqrt(w * np.where(se, 1 - rho, 1.0))
    lam[se, n_net] = np.sqrt(w[se] * rho)
    counts = subject.bundle_counts[dmn_bundles.index.to_numpy()]
    strength = counts / max(1, subject.bundle_counts.max())
    for j, (a, b, s) in enumerate(zip(dmn_bundles["parcel_a"], dmn_bundles["parcel_b"], strength,
                                      strict=True)):
        load = np.sqrt(max(params["kappa"], 0) * s)
        lam[index_of[int(a)], n_net + 1 + j] = load
        lam[index_of[int(b)], n_net + 1 + j] = load
    phi = np.eye(n_fac)
    phi[:n_net, :n_net] = design.phi
    common = np.einsum("ij,jk,ik->i", lam, phi, lam)
    unique = np.maximum(0.15, 1.0 - common)
    return FactorModel(lam, phi, unique)


def population_coupling(
    table: pd.DataFrame, design: GroupDesign, subject: SubjectEffects, params: dict[str, float],
    bundles: pd.DataFrame, sc: np.ndarray,
) -> float:
    """DMN SC-FC coupling (:func:`sc_fc_coupling`) of the session's population FC."""
    fc = factor_model(table, design, subject, params, bundles).population
    return sc_fc_coupling(fc, sc, table["network"].to_numpy(), DMN)


def calibrate_coupling(
    table: pd.DataFrame, design: GroupDesign, subject: SubjectEffects, bundles: pd.DataFrame,
    sc: np.ndarray, roles: tuple[str, ...] = ("pre", "post", "maintenance"),
) -> SubjectEffects:
    """``kappa`` per role so the population coupling moves as the subject's trajectory says.

    Target at ``role``: ``c_pre + trajectory_factor(role) * delta["kappa"]`` with ``c_pre``
    the coupling at ``pre["kappa"]``; each ``kappa`` is found by root-finding below the
    coupling's maximum (the other parameters at their values for that role).  When a target
    is above what the model reaches for this subject (about 1 subject in 300), ``delta``
    shrinks to 98 % of the largest reachable change, for every role alike, and the
    returned subject carries it.  Subjects without a planted coupling change, or without
    DMN-DMN bundles, are returned unchanged.
    """
    if subject.delta["kappa"] == 0:
        return subject

    def coupling(role: str, kappa: float) -> float:
        params = {**subject.params(role), "kappa": kappa}
        return population_coupling(table, design, subject, params, bundles, sc)

    c_pre = coupling("pre", subject.pre["kappa"])
    if not np.isfinite(c_pre):
        return subject
    grid = np.linspace(0.0, 1.0, 41)
    moved = [r for r in roles if r != "pre"]
    curves = {r: np.array([coupling(r, k) for k in grid]) for r in moved}
    delta = subject.delta["kappa"]
    for role in moved:
        peak, factor = curves[role].max(), subject.trajectory_factor(role)
        if c_pre + factor * delta > peak:
            delta = 0.98 * (peak - c_pre) / factor
    kappas = {"pre": subject.pre["kappa"]}
    for role in moved:
        target = c_pre + subject.trajectory_factor(role) * delta
        top = int(np.argmax(curves[role]))
        kappas[role] = float(brentq(lambda k, r=role, t=target: coupling(r, k) - t,
                                    0.0, grid[top], xtol=1e-10))
    return replace(subject, delta={**subject.delta, "kappa": delta}, kappa_by_role=kappas)


def bandlimited(rng: np.random.Generator, n_series: int, n_t: int, tr: float) -> np.ndarray:
    """White-spectrum series restricted to ``BAND_HZ`` (rows standardised)."""
    freqs = np.fft.rfftfreq(n_t, tr)
    keep = (freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])
    spec = np.zeros((n_series, len(freqs)), complex)
    spec[:, keep] = rng.normal(size=(n_series, keep.sum())) + 1j * rng.normal(
        size=(n_series, keep.sum())
    )
    x = np.fft.irfft(spec, n=n_t, axis=1)
    return _standardise(x)


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(1, keepdims=True)
    return x / x.std(1, keepdims=True)


def draw_latents(
    rng: np.random.Generator, model: FactorModel, n_t: int, tr: float, dummies: int
) -> np.ndarray:
    """Parcel latent series ``(P, n_t)``, standardised over the non-dummy volumes."""
    n_use = n_t - dummies
    factors = bandlimited(rng, model.phi.shape[0], n_use, tr)
    n_band = 2 * int(((np.fft.rfftfreq(n_use, tr) >= BAND_HZ[0])
                      & (np.fft.rfftfreq(n_use, tr) <= BAND_HZ[1])).sum())
    if factors.shape[0] < n_band - 4:
        # orthonormal factors make the realised FC follow the planted model closely
        q, _ = np.linalg.qr(factors.T)
        factors = _standardise(q.T)
    chol = np.linalg.cholesky(model.phi)
    unique = bandlimited(rng, model.loadings.shape[0], n_use, tr)
    x = model.loadings @ chol @ factors + np.sqrt(model.unique)[:, None] * unique
    x = _standardise(x)
    # dummy volumes continue the series backwards (they are discarded anyway)
    lead = x[:, :dummies][:, ::-1] if dummies else x[:, :0]
    return np.concatenate([lead, x], axis=1)


def realised_fc(latents: np.ndarray, dummies: int) -> np.ndarray:
    """Pearson correlation of the latent series over the non-dummy volumes."""
    fc = np.corrcoef(latents[:, dummies:])
    np.fill_diagonal(fc, 1.0)
    return fc


def mean_block(fc: np.ndarray, networks: np.ndarray, a: str, b: str) -> float:
    """Mean FC between networks ``a`` and ``b`` (upper triangle when ``a == b``)."""
    ia, ib = networks == a, networks == b
    block = fc[np.ix_(ia, ib)]
    if a == b:
        return float(block[np.triu_indices(ia.sum(), 1)].mean())
    return float(block.mean())


def sc_fc_coupling(fc: np.ndarray, sc: np.ndarray, networks: np.ndarray, net: str) -> float:
    """Pearson r between FC and SC over the edges within network ``net``."""
    idx = np.flatnonzero(networks == net)
    iu = np.triu_indices(len(idx), 1)
    f = fc[np.ix_(idx, idx)][iu]
    s = sc[np.ix_(idx, idx)][iu]
    if s.std() == 0:
        return float("nan")
    return float(np.corrcoef(f, s)[0, 1])
