#!/usr/bin/env bash
# The TVC layer comparison and λ sweep of docs/results.md (after scripts/regenerate_results.sh); resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
IC=.venv/bin/icl-circuits
D=docs/results
$IC clean --tasks present_simple_past_simple,algo_last,location_continent --compare-layers 10,11,12,13 --threads 1 --quiet \
  --out $D/tvc/layers
$IC clean --tasks present_simple_past_simple,location_country,country_capital --sweep-l1 1e-4,1e-3,1e-2,2.5e-2,1e-1 \
  --layer 12 --threads 1 --quiet --out $D/tvc/l1_sweep
