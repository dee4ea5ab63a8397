"""What every SAE / transcoder trainer shares: parameters, normalisation, centring, dead tracking,
the step skeleton, exact resume and the export into a JumpReLU SAE (TrainerConfig is in config.py).

Shared recipe (the paper's App. B): Adam(lr 1e-3, betas (0, 0.99)); encoder initialised
orthogonally, decoder = its transpose, biases 0; Anthropic input normalisation (Conerly et al. 2024)
with a separate output scale for transcoders; weights stored in `param_dtype` (bfloat16 by default),
biases and thresholds in float32, all math in float32.

Conventions:
  * Everything inside a trainer is in *normalised* units: x_n = x * s_in, y_n = y * s_out, and
    the SAE predicts y_n. `to_jumprelu` sets input_scale = s_in, output_scale = s_out, so the
    exported SAE reads and writes model units.
  * With `center_input` the encoder reads x_n - b_dec (SAEs) or x_n - b_in (transcoders); the
    export folds that centre into b_enc, so the exported SAE reads x directly.
  * A latent "fires" on a row when its (training-mode) activation is > 0.

Subclasses (one file per architecture) set `arch` and implement `_arch_params`, `_forward`,
`_encode_inference` and `_export_tensors`, plus optionally `_sparsity`, `_aux`, `_recon_terms`,
`_commit` and `_extra_state`. `SAETrainer(cfg, sae_cfg)` builds the subclass named by cfg.arch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from icl_circuits.sae.dictionary import JumpReLUSAE, SAEConfig, fold_b_dec_into_b_enc
from icl_circuits.sae.distributed import LOCAL, RowComm
from icl_circuits.sae.trainers.config import _DTYPES, TrainerConfig


class SAETrainer:
    """Trains one SAE (y = x) or transcoder (y given) with `step`, exports with `to_jumprelu`.

    `SAETrainer(cfg, sae_cfg)` returns the subclass registered for cfg.arch (GatedTrainer, ...).
    """

    arch: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type["SAETrainer"]]] = {}
    _STATE: ClassVar[tuple[str, ...]] = ()  # extra attributes a subclass saves in state_dict

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.arch:
            SAETrainer._registry[cls.arch] = cls

    def __new__(cls, cfg: TrainerConfig | None = None, sae_cfg: SAEConfig | None = None) -> "SAETrainer":
        # (both optional so that copy / pickle, which call cls.__new__(cls), work on a subclass)
        if cls is SAETrainer:  # dispatch: the base class builds the trainer for cfg.arch
            if cfg is None:
                raise TypeError("SAETrainer(cfg, sae_cfg) needs a TrainerConfig")
            if cfg.arch not in SAETrainer._registry:
                raise ValueError(f"no trainer registered for arch {cfg.arch!r} (have {sorted(SAETrainer._registry)})")
            cls = SAETrainer._registry[cfg.arch]
        elif cfg is not None and cfg.arch != cls.arch:
            raise ValueError(f"{cls.__name__} trains arch {cls.arch!r}, but cfg.arch = {cfg.arch!r}")
        return super().__new__(cls)

    def __init__(self, cfg: TrainerConfig, sae_cfg: SAEConfig) -> None:
        for name in ("d_in", "d_sae", "d_out"):
            if getattr(cfg, name) != getattr(sae_cfg, name):
                mine, theirs = getattr(cfg, name), getattr(sae_cfg, name)
                raise ValueError(f"TrainerConfig.{name}={mine} != SAEConfig.{name}={theirs}")
        self.cfg = cfg
        self.sae_cfg = sae_cfg
        want_k = self._export_k()
        if sae_cfg.k is not None and sae_cfg.k != want_k:
            raise ValueError(f"SAEConfig.k={sae_cfg.k} conflicts with arch {cfg.arch!r} (k={want_k})")
        assert cfg.d_out is not None
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        self.wdt = _DTYPES[cfg.param_dtype]

        gen = torch.Generator().manual_seed(cfg.seed)
        W_enc = torch.nn.init.orthogonal_(torch.empty(d_in, d_sae), generator=gen)  # [d_in, d_sae]
        if d_out == d_in:
            W_dec = W_enc.T.clone()  # [d_sae, d_out]
        else:
            W_dec = torch.nn.init.orthogonal_(torch.empty(d_sae, d_out), generator=gen)  # [d_sae, d_out]
        p = torch.nn.Parameter
        # insertion order = optimizer parameter order; kept as before the split so old checkpoints load
        self.params: dict[str, torch.nn.Parameter] = {
            "W_enc": p(W_enc.to(self.wdt)),
            "W_dec": p(W_dec.to(self.wdt)),
            "b_dec": p(torch.zeros(d_out)),
        }
        self.params.update({k: p(v) for k, v in self._arch_params().items()})
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
        # batch statistics over the rows of a global batch; data-parallel training (sae/distributed.py)
        # sets a DistRowComm, whose rows are split over ranks
        self.comm: RowComm = LOCAL

    # -- device ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.params["W_enc"].device

    def to(self, device: torch.device | str) -> "SAETrainer":
        """Move parameters, optimiser state and per-latent counters to `device`; returns self."""
        device = torch.device(device)
        if self.device != device:
            saved = self.opt.state_dict()
            self.params = {k: torch.nn.Parameter(p.detach().to(device)) for k, p in self.params.items()}
            # a new optimiser over the moved parameters (same order); load_state_dict moves Adam's moments to them
            self.opt = type(self.opt)(list(self.params.values()), **self.opt.defaults)
            self.opt.load_state_dict(saved)
        for k, v in vars(self).items():  # steps_since_fire, fire_buf, token_buf, BatchTopK's threshold, ...
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))
        return self

    # -- per-architecture hooks --------------------------------------------------------------
    def _arch_params(self) -> dict[str, torch.Tensor]:
        """Parameters besides W_enc, W_dec, b_dec (and b_in), in optimizer order; biases float32."""
        return {"b_enc": torch.zeros(self.cfg.d_sae)}

    def _export_k(self) -> int | None:
        """The k of the exported JumpReLUSAE (None: no per-row top-k at inference)."""
        return None

    def _pre(self, x_c: torch.Tensor, P: dict[str, torch.Tensor]) -> torch.Tensor:
        """Centred normalised inputs [batch, d_in] -> the pre-activations the export thresholds [batch, d_sae]."""
        return x_c @ P["W_enc"] + P["b_enc"]

    def _forward(self, x_c: torch.Tensor, P: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Training forward on centred inputs [batch, d_in]. Must return at least
        y_hat [batch, d_out], fires [d_sae] (rows each latent fired on) and l0 [batch] (float)."""
        raise NotImplementedError

    def _encode_inference(self, pre: torch.Tensor, P: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pre-activations [batch, d_sae] (from `_pre`) -> inference latents [batch, d_sae]."""
        raise NotImplementedError

    def _export_tensors(self, P: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fp32 params -> JumpReLUSAE tensors (W_enc, b_enc, W_dec, b_dec, threshold) before centre folding."""
        return {"W_enc": P["W_enc"], "b_enc": P["b_enc"], "W_dec": P["W_dec"], "b_dec": P["b_dec"],
                "threshold": torch.zeros(self.cfg.d_sae)}  # fmt: skip

    def _sparsity(self, out: dict[str, Any]) -> torch.Tensor | None:
        return None

    def _aux(self, out: dict[str, Any], y_n: torch.Tensor, dead: torch.Tensor) -> torch.Tensor | None:
        return None

    def _recon_terms(self, out: dict[str, Any], y_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction term of the loss, reconstruction error to report); the same but for Matryoshka."""
        recon = (out["y_hat"] - y_n).pow(2).sum(-1).mean()
        return recon, recon

    def _commit(self, out: dict[str, Any]) -> None:
        """Update non-gradient state (e.g. BatchTopK's threshold) after a successful step."""

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
        rows = self.norm_rows + self.comm.rows(x.shape[0])
        if self.cfg.norm_centered:  # norms of the part that varies (see TrainerConfig.norm_centered)
            x, y = x - self.comm.col_mean(x), y - self.comm.col_mean(y)
        in_sum = self.in_norm_sum + self.comm.all_sum(x.norm(dim=-1).sum()).item()
        out_sum = self.out_norm_sum + self.comm.all_sum(y.norm(dim=-1).sum()).item()
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
    def _fp32_params(self) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in self.params.items()}  # upcast: bf16 storage, fp32 math

    def _centre(self, P: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The vector subtracted from normalised inputs before encoding, or None."""
        if not self.cfg.center_input:
            return None
        return P["b_in"] if self.is_transcoder else P["b_dec"]

    def _dead_pre(self, x_det: torch.Tensor, P: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """idx [n] -> pre-activations [batch, n] of those latents only, on inputs centred by a detached
        centre (so the dead-latent losses, ghost grads and AuxK, never move the shared centre)."""
        return lambda idx: x_det @ P["W_enc"][:, idx] + P["b_enc"][idx]

    def forward_train(self, x_n: torch.Tensor) -> dict[str, Any]:
        """x_n: [batch, d_in] normalised -> the training forward's outputs (all float32)."""
        P = self._fp32_params()
        c = self._centre(P)
        x_det = x_n if c is None else x_n - c.detach()  # [batch, d_in]
        x_c = x_n if c is None else x_n - c  # [batch, d_in]
        out = self._forward(x_c, P)
        out["P"] = P
        out["dead_pre"] = self._dead_pre(x_det, P)
        return out

    def losses(self, x_n: torch.Tensor, y_n: torch.Tensor, dead: torch.Tensor) -> dict[str, Any]:
        """All loss terms (mean over rows) on a normalised batch, given the dead mask [d_sae]."""
        out = self.forward_train(x_n)
        train_recon, recon = self._recon_terms(out, y_n)
        zero = recon.new_zeros(())
        sparsity = self._sparsity(out)
        aux = self._aux(out, y_n, dead)
        sparsity = zero if sparsity is None else sparsity
        aux = zero if aux is None else aux
        ghost = zero
        dead_frac = dead.float().mean()
        if self.cfg.ghost_grads and dead.any():
            ghost = self._ghost_loss(out, y_n - out["y_hat"].detach(), recon, dead) * dead_frac
        return {"loss": train_recon + sparsity + aux + ghost, "recon": recon, "sparsity": sparsity, "aux": aux,
                "ghost": ghost, "y_hat": out["y_hat"], "fires": out["fires"], "l0": out["l0"],
                "dead_fraction": dead_frac, "out": out}  # fmt: skip

    def _ghost_loss(
        self, out: dict[str, Any], residual: torch.Tensor, recon: torch.Tensor, dead: torch.Tensor
    ) -> torch.Tensor:
        """Ghost grads (softplus variant): dead features alone try to explain the residual.

        Indexing by the dead features means the gradient reaches only their encoder columns,
        biases and decoder rows.
        """
        idx = dead.nonzero().squeeze(-1)  # [n_dead]
        h = F.softplus(out["dead_pre"](idx))  # [batch, n_dead] pre-activations of the dead features only
        ghost_out = h @ out["P"]["W_dec"][idx]  # [batch, d_out]
        # rescale each row to half the residual's norm (scale detached, as in Rajamanoharan's variant)
        scale = 0.5 * residual.norm(dim=-1) / (ghost_out.norm(dim=-1) + 1e-6)  # [batch]
        ghost_out = ghost_out * scale.detach()[:, None]
        ghost_mse = (ghost_out - residual).pow(2).sum(-1).mean()
        g, r = self.comm.means(torch.stack([ghost_mse, recon]).detach(), residual.shape[0])  # global batch's
        return ghost_mse * (r / g.clamp(min=1e-12)).detach()  # ghost loss sized like recon

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
        return x.to(self.device).float(), y.to(self.device).float()  # rows may come off disk on the CPU

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, float]:
        """One optimiser step on x: [batch, d_in] (targets y: [batch, d_out], default x).

        Raises FloatingPointError, leaving every piece of state untouched, if the loss or a gradient
        is not finite.
        """
        x, y = self._check_batch(x, y)
        n_local, n = x.shape[0], self.comm.rows(x.shape[0])  # this rank's rows, the global batch's
        s_in, s_out, norm_update = self._scales_with(x, y)
        x_n, y_n = x * s_in, y * s_out  # [batch, d_in], [batch, d_out]
        dead = self.dead_mask()  # [d_sae] from the steps before this one
        saved_biases = self._init_biases(x_n, y_n)

        self.opt.zero_grad(set_to_none=True)
        L = self.losses(x_n, y_n, dead)
        # every rank must take the same branch (an empty shard's loss is NaN and does not count)
        bad = [] if self.comm.all_true(n_local == 0 or bool(torch.isfinite(L["loss"]))) else ["loss"]
        if not bad:
            L["loss"].backward()
            self.comm.reduce_grads(self.params.values(), n_local, n)
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
        self._commit(L["out"])
        fires = self.comm.all_sum(L["fires"])  # [d_sae] rows of the global batch each latent fired on
        slot = self.n_steps % self.cfg.dead_window
        self.fire_buf[slot] = fires.to(torch.int32)
        self.token_buf[slot] = n
        self.steps_since_fire = torch.where(fires > 0, 0, self.steps_since_fire + 1)
        self.n_steps += 1

        with torch.no_grad():
            err = self.comm.all_sum((y_n - L["y_hat"]).pow(2).sum())
            var = self.comm.all_sum((y_n - self.comm.col_mean(y_n)).pow(2).sum())
            names = ("loss", "recon", "sparsity", "aux", "ghost")
            local = torch.stack([L[k].detach().float() for k in names] + [L["l0"].float().mean()])  # [6] this rank's means
            loss, recon, sparsity, aux, ghost, l0 = self.comm.means(local, n_local).tolist()  # the global batch's
        return {
            "loss": loss,
            "recon": recon,  # squared error summed over d_out, mean over rows (normalised units)
            "mse": recon / self.cfg.d_out,  # type: ignore[operator]
            "sparsity": sparsity,
            "aux": aux,
            "ghost": ghost,
            "l0": l0,
            "dead_fraction": L["dead_fraction"].item(),
            "fve": (1 - err / var.clamp(min=1e-12)).item(),
        }

    @torch.no_grad()
    def _init_biases(self, x_n: torch.Tensor, y_n: torch.Tensor) -> dict[str, torch.Tensor]:
        """b_dec_init='mean': on the first step set b_dec (and b_in) to the batch means. Returns the old values."""
        if self.n_steps > 0 or self.cfg.b_dec_init != "mean":
            return {}
        if not self.comm.all_true(bool(torch.isfinite(x_n).all() and torch.isfinite(y_n).all())):
            return {}  # the step will fail on its own; leave the parameters alone
        new = {"b_dec": self.comm.col_mean(y_n)}  # [d_out] over the global batch
        if "b_in" in self.params:
            new["b_in"] = self.comm.col_mean(x_n)  # [d_in]
        old = {k: self.params[k].detach().clone() for k in new}
        for k, v in new.items():
            self.params[k].copy_(v)
        return old

    # -- inference (model units), the reference the export must match -------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, d_in] model units -> inference latents [batch, d_sae] (BatchTopK: threshold mode)."""
        P = self._fp32_params()
        x_n = x.to(self.device).float() * self.s_in
        c = self._centre(P)
        return self._encode_inference(self._pre(x_n if c is None else x_n - c, P), P)

    @torch.no_grad()
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Latents [batch, d_sae] -> reconstruction [batch, d_out] in model units."""
        P = self._fp32_params()
        return (f.to(self.device).float() @ P["W_dec"] + P["b_dec"]) / self.s_out

    # -- export ------------------------------------------------------------------------------
    @torch.no_grad()
    def to_jumprelu(self) -> JumpReLUSAE:
        """The trained SAE as an exactly equivalent fp32 JumpReLUSAE in model units, on the CPU
        (saved as is; users move it to their model's device)."""
        P = {k: v.detach().float().cpu().clone() for k, v in self.params.items()}
        cfg = replace(self.sae_cfg, input_scale=self.s_in, output_scale=self.s_out, k=self._export_k(),
                      extra=dict(self.sae_cfg.extra))  # fmt: skip
        tensors = {k: v.cpu() for k, v in self._export_tensors(P).items()}  # some read trainer state (thresholds)
        c = self._centre(P)
        if c is not None:
            # (x_n - c) @ W + b = x_n @ W + (b - c @ W); thresholds compare the same pre-activations
            tensors["b_enc"] = fold_b_dec_into_b_enc(tensors["W_enc"], tensors["b_enc"], c)
        return JumpReLUSAE(cfg, tensors, where=f"{type(self).__name__}.to_jumprelu")

    # -- checkpoints -------------------------------------------------------------------------
    _COUNTERS = ("n_steps", "norm_count", "norm_rows", "in_norm_sum", "out_norm_sum", "norm_frozen", "s_in", "s_out")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; only tensors, numbers, strings, lists and dicts."""
        extra = {k: getattr(self, k) for k in self._STATE}
        return {
            "cfg": self.cfg.to_dict(),
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "optimizer": self.opt.state_dict(),
            "steps_since_fire": self.steps_since_fire.clone(),
            "fire_buf": self.fire_buf.clone(),
            "token_buf": self.token_buf.clone(),
            **{k: getattr(self, k) for k in self._COUNTERS},
            **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        mine = self.cfg.to_dict()
        saved = d["cfg"]
        missing = set(mine) - set(saved)
        if missing:  # a checkpoint from before a field existed: that field takes its default
            saved = TrainerConfig.from_dict(saved).to_dict()
        if saved != mine:
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
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
        for k in self._STATE:
            if k not in d:
                raise ValueError(f"checkpoint lacks {k!r}, which a {self.cfg.arch} trainer needs to resume")
            setattr(self, k, d[k].clone() if isinstance(d[k], torch.Tensor) else d[k])
        self.to(self.device)  # checkpoints load on the CPU; counters follow the parameters

