"""The SAE set of a circuit: one SAE per (kind, layer), named 'kind.layer', checked against the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from icl_circuits.core.model import LM
from icl_circuits.core.sites import Site
from icl_circuits.interventions.splice import in_out_sites
from icl_circuits.methods.circuits.config import KIND_SITE_OPTIONS, SAE_KINDS, CircuitConfig
from icl_circuits.sae.dictionary import JumpReLUSAE
from icl_circuits.sae.registry import SAERef


def sae_sites(sae: JumpReLUSAE) -> tuple[Site, Site]:
    """(site the SAE reads, site its output replaces), resid_post.L written as resid_pre.L+1."""
    return in_out_sites(sae, canonical=True)


def sae_key(kind: str, layer: int) -> str:
    """('resid', 11) -> 'resid.11', the key of node names and graph files (SAERef.key)."""
    return SAERef(kind, layer).key


def parse_key(key: str) -> tuple[str, int]:
    """'resid.11', 'resid:11' or any other SAERef spelling of a kind and layer -> ('resid', 11)."""
    try:
        ref = SAERef.parse(key)
    except ValueError:
        ref = None
    if ref is None or ref.kind is None or ref.layer is None or not ref.is_starter:
        raise ValueError(f"bad SAE key {key!r}; use '<kind>.<layer>' with kind in {SAE_KINDS}, e.g. 'resid.11'")
    return ref.kind, ref.layer


@dataclass
class CircuitSAEs:
    """The SAEs of a circuit, one per (kind, layer), in forward order."""

    saes: dict[str, JumpReLUSAE]  # key 'kind.layer' -> SAE

    @property
    def keys(self) -> list[str]:
        return sorted(self.saes, key=lambda k: (parse_key(k)[1], SAE_KINDS.index(parse_key(k)[0])))

    def in_site(self, key: str) -> Site:
        return sae_sites(self.saes[key])[0]

    def out_site(self, key: str) -> Site:
        return sae_sites(self.saes[key])[1]

    @property
    def start_layer(self) -> int:
        return min(parse_key(k)[1] for k in self.saes)

    def sizes(self) -> dict[str, int]:
        """key -> number of features + 1 (the error node)."""
        return {k: self.saes[k].cfg.d_sae + 1 for k in self.keys}


def circuit_saes(
    lm: LM, cfg: CircuitConfig, saes: Mapping[str, JumpReLUSAE] | None = None, train_if_missing: bool = False
) -> CircuitSAEs:
    """One SAE per (kind, layer) of cfg: the user's (keys 'resid.11' / 'resid:11'), else the starter suite.

    SAEs are moved to the model's device and dtype.

    Raises a ValueError when an SAE does not fit the model (d_in, layer) or reads the wrong site.
    """
    given = {sae_key(*parse_key(k)): v for k, v in (saes or {}).items()}
    for layer in cfg.layers:
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer} outside 0..{lm.n_layers - 1} of {lm.name!r}")
    out: dict[str, JumpReLUSAE] = {}
    for layer in sorted(set(cfg.layers)):
        for kind in cfg.kinds:
            key = sae_key(kind, layer)
            sae = given.get(key)
            if sae is None:
                if saes is not None and given:
                    raise ValueError(f"no SAE given for {key!r} (given: {sorted(given)}); pass one or drop the layer/kind")
                sae = SAERef(kind, layer).resolve(lm, train_if_missing=train_if_missing)
            check_sae(lm, key, sae)
            out[key] = sae.to(device=lm.device, dtype=lm.dtype)  # in place, like nn.Module.to
    return CircuitSAEs(out)


def check_sae(lm: LM, key: str, sae: JumpReLUSAE) -> None:
    kind, layer = parse_key(key)
    c = sae.cfg
    got_in, got_out = sae_sites(sae)
    allowed = [(Site(layer, i), Site(layer, o)) for i, o in KIND_SITE_OPTIONS[kind]]
    if (got_in, got_out) not in allowed:
        want = ", or ".join(f"read {i} and write {o}" for i, o in allowed)
        raise ValueError(f"SAE {key!r} must {want}; it reads {c.site} and writes {c.out_site or c.site}")
    sae.check_compatible(lm)
