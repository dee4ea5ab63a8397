"""Node-effect (Alg. 2) cost vs. one plain forward + backward of the model on the same batch.

  floor    : LM.run with the same metric (log-probs at the scored positions only), backward to
             one probe at resid_pre of the circuit's first layer (the backward a node-effect pass
             cannot avoid).
  hf plain : the transformers CausalLM forward (full-vocabulary logits everywhere), the same
             metric, backward to the input embeddings.
  nodes    : icl_circuits.methods.circuits.node_effects: forward + backward with probes at every SAE
             site of the layer range, then SAE encodes and grad x value by token type for
             every latent and error node (starter SAEs, layers 11-12 by default).

Medians over repeats, all in the same run. Usage:
  python benchmarks/bench_circuits.py [--task antonyms] [--n-prompts 8] [--n-shots 8] [--layers 11,12] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from _timing import timed

from icl_circuits import load_model, load_task
from icl_circuits.methods.circuits import (
    CircuitConfig,
    CircuitRunConfig,
    circuit_batches,
    circuit_saes,
    metric_of,
    metric_scoring,
    node_effects,
)
from icl_circuits.core.sites import Site


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="antonyms")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--n-shots", type=int, default=8)
    ap.add_argument("--layers", default="11,12")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    layers = tuple(int(l) for l in args.layers.split(","))
    cfg = CircuitRunConfig(circuit=CircuitConfig(layers=layers), n_prompts=args.n_prompts, n_shots=args.n_shots)
    saes = circuit_saes(lm, cfg.circuit)
    batch, _ = circuit_batches(lm, load_task(args.task), cfg)
    sc = metric_scoring(batch, cfg.circuit)
    first = Site(min(layers), "resid_pre")

    def floor() -> float:
        with torch.enable_grad():
            out = lm.run(batch.input_ids, batch.attention_mask, probe=[first], logprob_positions=sc.positions, targets=sc.targets)
            m = metric_of(out)[0]
            m.backward()
        return float(m.detach())

    emb = lm.model.get_input_embeddings()

    def hf_plain() -> float:
        with torch.enable_grad():
            x = emb(batch.input_ids).detach().requires_grad_(True)
            logits = lm.model(inputs_embeds=x, attention_mask=batch.attention_mask, use_cache=False).logits
            lp = torch.log_softmax(logits.float(), -1)[sc.positions].gather(-1, sc.targets[:, None])
            m = lp.mean()
            m.backward()
        return float(m.detach())

    def nodes() -> float:
        return node_effects(lm, batch, saes, cfg.circuit).metric

    floor(), hf_plain(), nodes()  # warm-up
    t_floor, m1 = timed(floor, args.repeats)
    t_hf, m2 = timed(hf_plain, args.repeats)
    t_nodes, m3 = timed(nodes, args.repeats)
    assert abs(m1 - m3) < 1e-4 and abs(m1 - m2) < 1e-3, (m1, m2, m3)
    n_nodes = sum(s.cfg.d_sae + 1 for s in saes.saes.values()) * len(cfg.circuit.node_types)
    print(f"batch {tuple(batch.input_ids.shape)} ({args.task}, {args.n_prompts} prompts x {args.n_shots} shots), "
          f"{int(sc.positions.sum())} scored positions, {len(saes.saes)} SAEs (layers {args.layers}), {n_nodes} nodes, "
          f"{args.threads} thread(s), median of {args.repeats}")  # fmt: skip
    print(f"{'what':58s} {'seconds':>8s} {'ratio':>6s}")
    print(f"{'floor: LM.run forward + backward to resid_pre.' + str(min(layers)):58s} {t_floor:8.3f} {1.0:6.2f}")
    print(f"{'HF CausalLM forward (full logits) + backward':58s} {t_hf:8.3f} {t_hf / t_floor:6.2f}")
    print(f"{'node_effects (all latents + error nodes, by token type)':58s} {t_nodes:8.3f} {t_nodes / t_floor:6.2f}")
    print(f"node effects / plain forward+backward: {t_nodes / t_floor:.2f}x (floor), {t_nodes / t_hf:.2f}x (HF plain)")


if __name__ == "__main__":
    main()
