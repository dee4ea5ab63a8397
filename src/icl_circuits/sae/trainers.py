"""Train SAEs and transcoders with the paper's recipe (App. B), then export them as JumpReLU SAEs.

Recipe: Adam(lr 1e-3, betas (0, 0.99)); encoder initialised orthogonally, decoder = its transpose,
biases 0; Anthropic input normalisation (Conerly et al. 2024) with a separate output scale for
transcoders; Anthropic's decoder-norm-weighted sparsity penalty (decoder rows are never
renormalised); Rajamanoharan's ghost-grads variant (dead features only, scaled by the dead
fraction) with softplus in place of exp; weights (and the gated r_mag) stored in bfloat16, biases
in float32, all math in float32.

Conventions:
  * Everything inside the trainer is in *normalised* units: x_n = x * s_in, y_n = y * s_out, and
    the SAE predicts y_n. `to_jumprelu` sets input_scale = s_in, output_scale = s_out, so the
    exported SAE reads and writes model units.
  * The encoder reads x_n directly (no `x - b_dec`), as in Anthropic's April 2024 update; hence
    `gated_to_jumprelu(..., b_dec_on_input=False)` and no bias folding for relu/topk.
  * A feature "fires" on a row when its latent f > 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from .dictionary import JumpReLUSAE, SAEConfig, fold_b_dec_into_b_enc, gated_to_jumprelu

ARCHS: tuple[str, ...] = ("gated", "relu", "topk")

# Default sparsity coefficients for the decoder-norm-weighted L1 penalty on Anthropic-normalised
# inputs (E||x|| = sqrt(d_in), reconstruction error summed over dimensions); not swept (the paper
# does no sweeps either). ReLU: lambda = 5, the value Conerly et al. (2024) report for this exact
# loss and normalisation. Gated: twice that, because its penalty acts on the gate path only while two
# reconstruction terms (recon through the magnitude path, aux through the gate path) pull on the
# shared encoder; on planted toy data (tests) gated needed ~5x the ReLU coefficient to reach the
# same L0, so 2x is a conservative choice. Top-k has no penalty. Conerly et al. also warm lambda
# up over the first 5% of training; we do not, so callers may prefer lower values early.
DEFAULT_L1: dict[str, float] = {"gated": 10.0, "relu": 5.0, "topk": 0.0}

_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(kw_only=True)
class TrainerConfig:
    """Hyper-parameters of one SAE / transcoder run (defaults follow the paper's App. B)."""

    arch: str = "gated"
    d_in: int
    d_sae: int
    d_out: int | None = None  # = d_in unless a transcoder
    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.99)
    l1_coeff: float | None = None  # None -> DEFAULT_L1[arch]
    k: int = 32  # topk only
    ghost_grads: bool = True
    dead_window: int = 1000  # batches in the density buffer
    dead_density: float = 5e-6  # dead if fires/tokens over a full window is below this
    dead_steps: int = 2000  # ... or if it has not fired for this many steps
    param_dtype: str = "bfloat16"  # storage dtype of W_enc, W_dec, r_mag; biases are always float32
    normalize: bool = True
    norm_batches: int = 10
    # The encoder reads centred inputs: x - b_dec for SAEs (as in the Gated SAE paper), x - b_in
    # (a learned input bias) for transcoders. On Gemma's residual stream one dimension carries most
    # of ||x||, so without centring short runs waste their capacity on the mean.
    center_input: bool = True
    b_dec_init: str = "zeros"  # 'zeros' (paper, App. B) or 'mean': b_dec (and b_in) = data mean of the first batch
    # Anthropic normalisation scales inputs to E||x|| = sqrt(d). With norm_centered the scale uses
    # E||x - batch mean|| instead: on Gemma 3 a near-constant massive dimension holds ~90% of ||x||,
    # which otherwise leaves the varying part tiny and makes the sparsity penalty ~20x too strong.
    norm_centered: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"TrainerConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.l1_coeff is None:
            self.l1_coeff = DEFAULT_L1[self.arch]
        if self.b_dec_init not in ("zeros", "mean"):
            raise ValueError(f"TrainerConfig.b_dec_init must be 'zeros' or 'mean', got {self.b_dec_init!r}")
        if self.param_dtype not in _DTYPES:
            raise ValueError(f"TrainerConfig.param_dtype must be one of {sorted(_DTYPES)}, got {self.param_dtype!r}")
        if self.arch == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae={self.d_sae}, got {self.k}")
        for name in ("d_in", "d_sae", "d_out", "dead_window", "dead_steps", "norm_batches"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TrainerConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)  # plain types only (torch.load(weights_only=True))
        return d


class SAETrainer:
    """Trains one SAE (y = x) or transcoder (y given) with `step`, exports with `to_jumprelu`."""

    def __init__(self, cfg: TrainerConfig, sae_cfg: SAEConfig) -> None:
        for name in ("d_in", "d_sae", "d_out"):
            if getattr(cfg, name) != getattr(sae_cfg, name):
                mine, theirs = getattr(cfg, name), getattr(sae_cfg, name)
                raise ValueError(f"TrainerConfig.{name}={mine} != SAEConfig.{name}={theirs}")
        want_k = cfg.k if cfg.arch == "topk" else None
        if sae_cfg.k is not None and sae_cfg.k != want_k:
            raise ValueError(f"SAEConfig.k={sae_cfg.k} conflicts with arch {cfg.arch!r} (k={want_k})")
        self.cfg = cfg
        self.sae_cfg = sae_cfg
        assert cfg.d_out is not None
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        wdt = _DTYPES[cfg.param_dtype]

        gen = torch.Generator().manual_seed(cfg.seed)
        W_enc = torch.nn.init.orthogonal_(torch.empty(d_in, d_sae), generator=gen)  # [d_in, d_sae]
        if d_out == d_in:
            W_dec = W_enc.T.clone()  # [d_sae, d_out]
        else:
            W_dec = torch.nn.init.orthogonal_(torch.empty(d_sae, d_out), generator=gen)  # [d_sae, d_out]
        p = torch.nn.Parameter
        self.params: dict[str, torch.nn.Parameter] = {
            "W_enc": p(W_enc.to(wdt)),
            "W_dec": p(W_dec.to(wdt)),
            "b_dec": p(torch.zeros(d_out)),
        }
        if cfg.arch == "gated":
            self.params["b_gate"] = p(torch.zeros(d_sae))
            self.params["b_mag"] = p(torch.zeros(d_sae))
            self.params["r_mag"] = p(torch.zeros(d_sae, dtype=wdt))
        else:
            self.params["b_enc"] = p(torch.zeros(d_sae))
        self.is_transcoder = sae_cfg.kind == "transcoder" or d_out != d_in
        if self.is_transcoder and cfg.center_input:
            self.params["b_in"] = p(torch.zeros(d_in))  # input centre (the output space has b_dec)
        self.opt = torch.optim.Adam(list(self.params.values()), lr=cfg.lr, betas=cfg.betas)

        self.n_steps = 0
        # dead-feature tracking
        self.steps_since_fire = torch.zeros(d_sae, dtype=torch.long)  # [d_sae]
        self.fire_buf = torch.zeros(cfg.dead_window, d_sae, dtype=torch.int32)  # [window, d_sae] per-batch fires
        self.token_buf = torch.zeros(cfg.dead_window, dtype=torch.long)  # [window] per-batch rows
        # normalisation: running sums of ||x|| / ||y|| over the first norm_batches batches
        self.norm_count = 0  # batches seen so far (stops at norm_batches)
        self.norm_rows = 0
        self.in_norm_sum = 0.0
        self.out_norm_sum = 0.0
        self.norm_frozen = not cfg.normalize
        self.s_in = 1.0
        self.s_out = 1.0

    # -- normalisation -----------------------------------------------------------------------
    def set_normalisation(self, s_in: float, s_out: float | None = None) -> None:
        """Fix the scales (SAE sees x * s_in, predicts y * s_out); s_out defaults to s_in for SAEs."""
        s_out = s_in if s_out is None else s_out
        if not (math.isfinite(s_in) and math.isfinite(s_out) and s_in > 0 and s_out > 0):
            raise ValueError(f"scales must be finite and > 0, got s_in={s_in}, s_out={s_out}")
        self.s_in, self.s_out = float(s_in), float(s_out)
        self.norm_frozen = True

    def _scales_with(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, dict[str, Any]]:
        """Scales to use for this batch (running estimate incl. this batch) and the state to commit."""
        if self.norm_frozen:
            return self.s_in, self.s_out, {}
        rows = self.norm_rows + x.shape[0]
        if self.cfg.norm_centered:  # norms of the part that varies (see TrainerConfig.norm_centered)
            x, y = x - x.mean(0), y - y.mean(0)
        in_sum = self.in_norm_sum + x.norm(dim=-1).sum().item()
        out_sum = self.out_norm_sum + y.norm(dim=-1).sum().item()
        s_in = math.sqrt(self.cfg.d_in) / (in_sum / rows)
        s_out = math.sqrt(self.cfg.d_out) / (out_sum / rows)  # type: ignore[operator]
        count = self.norm_count + 1
        new = dict(norm_rows=rows, in_norm_sum=in_sum, out_norm_sum=out_sum, norm_count=count,
                   s_in=s_in, s_out=s_out, norm_frozen=count >= self.cfg.norm_batches)  # fmt: skip
        return s_in, s_out, new

    # -- dead features -----------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        """[d_sae] bool: not fired for dead_steps steps, or density < dead_density over a full window."""
        dead = self.steps_since_fire >= self.cfg.dead_steps
        if self.n_steps >= self.cfg.dead_window:  # window full
            density = self.fire_buf.sum(0, dtype=torch.float64) / self.token_buf.sum().clamp(min=1)
            dead = dead | (density < self.cfg.dead_density)
        return dead

    # -- forward -----------------------------------------------------------------------------
    def _centre(self, P: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The vector subtracted from normalised inputs before encoding, or None."""
        if not self.cfg.center_input:
            return None
        return P["b_in"] if self.is_transcoder else P["b_dec"]

    def _forward(self, x_n: torch.Tensor) -> dict[str, torch.Tensor]:
        """x_n: [batch, d_in] normalised -> f, y_hat and what the losses need (all float32)."""
        P = {k: v.float() for k, v in self.params.items()}  # upcast: bf16 storage, fp32 math
        c = self._centre(P)
        x_ghost = x_n if c is None else x_n - c.detach()  # ghost grads must not move the shared centre
        if c is not None:
            x_n = x_n - c  # [batch, d_in]
        W_eff = P["W_enc"] * torch.exp(P["r_mag"]) if self.cfg.arch == "gated" else P["W_enc"]  # [d_in, d_sae]
        if self.cfg.arch == "gated":
            e = x_n @ P["W_enc"]  # [batch, d_sae]
            pi_gate = e + P["b_gate"]  # [batch, d_sae]
            pre = x_n @ W_eff + P["b_mag"]  # [batch, d_sae] magnitude path
            f = (pi_gate > 0).float() * torch.relu(pre)  # [batch, d_sae]
            act = torch.relu(pi_gate)  # [batch, d_sae] what the sparsity penalty sees
        else:
            pre = x_n @ P["W_enc"] + P["b_enc"]  # [batch, d_sae]
            f = torch.relu(pre)  # [batch, d_sae]
            if self.cfg.arch == "topk":
                top = f.topk(self.cfg.k, dim=-1)
                f = torch.zeros_like(f).scatter(-1, top.indices, top.values)  # [batch, d_sae]
            act = f
        y_hat = f @ P["W_dec"] + P["b_dec"]  # [batch, d_out]
        b_pre = P["b_mag"] if self.cfg.arch == "gated" else P["b_enc"]
        out = {"pre": pre, "f": f, "act": act, "y_hat": y_hat,
               "ghost_pre": lambda idx: x_ghost @ W_eff[:, idx] + b_pre[idx]}  # fmt: skip  # [batch, n_dead]
        if self.cfg.arch == "gated":
            out["y_gate"] = act @ P["W_dec"].detach() + P["b_dec"].detach()  # [batch, d_out]
        return out

    def losses(self, x_n: torch.Tensor, y_n: torch.Tensor, dead: torch.Tensor) -> dict[str, torch.Tensor]:
        """All loss terms (mean over rows) on a normalised batch, given the dead mask [d_sae]."""
        out = self._forward(x_n)
        f, y_hat = out["f"], out["y_hat"]
        recon = (y_hat - y_n).pow(2).sum(-1).mean()
        zero = recon.new_zeros(())
        sparsity, aux, ghost = zero, zero, zero
        if self.cfg.arch in ("relu", "gated"):
            dec_norm = self.params["W_dec"].float().norm(dim=-1)  # [d_sae]
            sparsity = self.cfg.l1_coeff * (out["act"] * dec_norm).sum(-1).mean()  # type: ignore[operator]
        if self.cfg.arch == "gated":
            aux = (y_n - out["y_gate"]).pow(2).sum(-1).mean()
        dead_frac = dead.float().mean()
        if self.cfg.ghost_grads and dead.any():
            ghost = self._ghost_loss(out["ghost_pre"], y_n - y_hat.detach(), recon, dead) * dead_frac
        return {"loss": recon + sparsity + aux + ghost, "recon": recon, "sparsity": sparsity, "aux": aux,
                "ghost": ghost, "f": f, "y_hat": y_hat, "dead_fraction": dead_frac}  # fmt: skip

    def _ghost_loss(
        self, ghost_pre: Any, residual: torch.Tensor, recon: torch.Tensor, dead: torch.Tensor
    ) -> torch.Tensor:
        """Ghost grads (softplus variant): dead features alone try to explain the residual.

        Indexing by the dead features means the gradient reaches only their encoder columns,
        biases and decoder rows.
        """
        idx = dead.nonzero().squeeze(-1)  # [n_dead]
        h = F.softplus(ghost_pre(idx))  # [batch, n_dead] pre-activations of the dead features only
        ghost_out = h @ self.params["W_dec"][idx].float()  # [batch, d_out]
        # rescale each row to half the residual's norm (scale detached, as in Rajamanoharan's variant)
        scale = 0.5 * residual.norm(dim=-1) / (ghost_out.norm(dim=-1) + 1e-6)  # [batch]
        ghost_out = ghost_out * scale.detach()[:, None]
        ghost_mse = (ghost_out - residual).pow(2).sum(-1).mean()
        return ghost_mse * (recon / ghost_mse.clamp(min=1e-12)).detach()  # ghost loss sized like recon

    # -- training ----------------------------------------------------------------------------
    def _check_batch(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        d_in, d_out = self.cfg.d_in, self.cfg.d_out
        if x.dim() != 2 or x.shape[1] != d_in:
            raise ValueError(f"x must have shape [batch, d_in={d_in}], got {tuple(x.shape)}")
        if y is None:
            if d_out != d_in:
                raise ValueError(f"a transcoder (d_out={d_out} != d_in={d_in}) needs targets y")
            y = x
        if y.dim() != 2 or y.shape != (x.shape[0], d_out):
            raise ValueError(f"y must have shape [batch={x.shape[0]}, d_out={d_out}], got {tuple(y.shape)}")
        return x.float(), y.float()

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, float]:
        """One optimiser step on x: [batch, d_in] (targets y: [batch, d_out], default x).

        Raises FloatingPointError, leaving every piece of state untouched, if the loss or a gradient
        is not finite.
        """
        x, y = self._check_batch(x, y)
        s_in, s_out, norm_update = self._scales_with(x, y)
        x_n, y_n = x * s_in, y * s_out  # [batch, d_in], [batch, d_out]
        dead = self.dead_mask()  # [d_sae] from the steps before this one
        saved_biases = self._init_biases(x_n, y_n)

        self.opt.zero_grad(set_to_none=True)
        L = self.losses(x_n, y_n, dead)
        bad = [] if torch.isfinite(L["loss"]) else ["loss"]
        if not bad:
            L["loss"].backward()
            bad = [n for n, p in self.params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in saved_biases.items():
                    self.params[k].copy_(v)
            raise FloatingPointError(
                f"SAETrainer.step {self.n_steps}: non-finite {', '.join(bad)} (loss={L['loss'].item()}); "
                "parameters, optimizer and counters left unchanged"
            )
        self.opt.step()

        # commit counters only after a successful step
        for k, v in norm_update.items():
            setattr(self, k, v)
        fired = L["f"] > 0  # [batch, d_sae]
        slot = self.n_steps % self.cfg.dead_window
        self.fire_buf[slot] = fired.sum(0).to(torch.int32)
        self.token_buf[slot] = x.shape[0]
        self.steps_since_fire = torch.where(fired.any(0), 0, self.steps_since_fire + 1)
        self.n_steps += 1

        with torch.no_grad():
            err = (y_n - L["y_hat"]).pow(2).sum()
            var = (y_n - y_n.mean(0)).pow(2).sum()
        return {
            "loss": L["loss"].item(),
            "recon": L["recon"].item(),  # squared error summed over d_out, mean over rows (normalised units)
            "mse": L["recon"].item() / self.cfg.d_out,  # type: ignore[operator]
            "sparsity": L["sparsity"].item(),
            "aux": L["aux"].item(),
            "ghost": L["ghost"].item(),
            "l0": fired.sum(-1).float().mean().item(),
            "dead_fraction": L["dead_fraction"].item(),
            "fve": (1 - err / var.clamp(min=1e-12)).item(),
        }

    @torch.no_grad()
    def _init_biases(self, x_n: torch.Tensor, y_n: torch.Tensor) -> dict[str, torch.Tensor]:
        """b_dec_init='mean': on the first step set b_dec (and b_in) to the batch means. Returns the old values."""
        if self.n_steps > 0 or self.cfg.b_dec_init != "mean":
            return {}
        if not (torch.isfinite(x_n).all() and torch.isfinite(y_n).all()):
            return {}  # the step will fail on its own; leave the parameters alone
        new = {"b_dec": y_n.mean(0)}  # [d_out]
        if "b_in" in self.params:
            new["b_in"] = x_n.mean(0)  # [d_in]
        old = {k: self.params[k].detach().clone() for k in new}
        for k, v in new.items():
            self.params[k].copy_(v)
        return old

    # -- export ------------------------------------------------------------------------------
    @torch.no_grad()
    def to_jumprelu(self) -> JumpReLUSAE:
        """The trained SAE as an exactly equivalent fp32 JumpReLUSAE in model units."""
        P = {k: v.detach().float().clone() for k, v in self.params.items()}
        cfg = replace(self.sae_cfg, input_scale=self.s_in, output_scale=self.s_out,
                      k=self.cfg.k if self.cfg.arch == "topk" else None, extra=dict(self.sae_cfg.extra))  # fmt: skip
        if self.cfg.arch == "gated":
            sae = gated_to_jumprelu(P["W_enc"], P["b_gate"], P["b_mag"], P["r_mag"], P["W_dec"], P["b_dec"],
                                    cfg, b_dec_on_input=False)  # fmt: skip
            tensors = sae.tensors()
        else:
            tensors = {"W_enc": P["W_enc"], "b_enc": P["b_enc"], "W_dec": P["W_dec"], "b_dec": P["b_dec"],
                       "threshold": torch.zeros(self.cfg.d_sae)}  # fmt: skip
        c = self._centre(P)
        if c is not None:
            # (x_n - c) @ W + b = x_n @ W + (b - c @ W); thresholds compare the same pre-activations
            tensors["b_enc"] = fold_b_dec_into_b_enc(tensors["W_enc"], tensors["b_enc"], c)
        return JumpReLUSAE(cfg, tensors, where="SAETrainer.to_jumprelu")

    # -- checkpoints -------------------------------------------------------------------------
    _COUNTERS = ("n_steps", "norm_count", "norm_rows", "in_norm_sum", "out_norm_sum", "norm_frozen", "s_in", "s_out")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; only tensors, numbers, strings, lists and dicts."""
        return {
            "cfg": self.cfg.to_dict(),
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "optimizer": self.opt.state_dict(),
            "steps_since_fire": self.steps_since_fire.clone(),
            "fire_buf": self.fire_buf.clone(),
            "token_buf": self.token_buf.clone(),
            **{k: getattr(self, k) for k in self._COUNTERS},
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        mine = self.cfg.to_dict()
        if d["cfg"] != mine:
            diff = {k: (d["cfg"].get(k), v) for k, v in mine.items() if d["cfg"].get(k) != v}
            raise ValueError(f"checkpoint config differs from this trainer's (saved, here): {diff}")
        if set(d["params"]) != set(self.params):
            raise ValueError(f"checkpoint params {sorted(d['params'])} != expected {sorted(self.params)}")
        with torch.no_grad():
            for k, p in self.params.items():
                if d["params"][k].shape != p.shape:
                    got = tuple(d["params"][k].shape)
                    raise ValueError(f"checkpoint {k} has shape {got}, expected {tuple(p.shape)}")
                p.copy_(d["params"][k])
        self.opt.load_state_dict(d["optimizer"])
        self.steps_since_fire = d["steps_since_fire"].clone()
        self.fire_buf = d["fire_buf"].clone()
        self.token_buf = d["token_buf"].clone()
        for k in self._COUNTERS:
            setattr(self, k, d[k])
