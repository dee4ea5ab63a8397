#!/usr/bin/env bash
# Regenerates the results in docs/results.md on the bundled Gemma 3 270M with starter suite v2 and the
# paper's defaults (docs/deviations.md). Two chains run side by side, one thread each; every command
# resumes from its --out folder, so the script can be re-run after an interruption.
#   bash scripts/regenerate_results.sh            # both chains
#   bash scripts/regenerate_results.sh circuits   # one chain: circuits | steering
# then scripts/regenerate_tvc_extra.sh (TVC layer comparison and λ sweep)
set -euo pipefail
cd "$(dirname "$0")/.."
IC=.venv/bin/icl-circuits
R=runs/v2
D=docs/results
# the 12 tasks of the circuit section (as many as the CPU budget allows; the rest run with the same commands)
T12=location_continent,country_capital,location_language,person_profession,antonyms,present_simple_past_simple,singular_plural,en_fr,fr_en,es_en,algo_first,algo_last

circuits() {
  $IC circuit --tasks "$T12" --layers 11-12 --ie-quality 0 --other-errors-curve --threads 1 --quiet --out $R/circuits
  $IC circuit --tasks location_continent,antonyms,country_capital --layers 11-12 --ie-quality 8 --no-cross-task \
    --threads 1 --quiet --out $R/circuits_ieq
  mkdir -p $D/circuits/ie_quality
  cp $R/circuits/{faithfulness.png,faithfulness.svg,faithfulness_errors_ablated.png,cross_task.png,cross_task.json,summary.csv} $D/circuits/
  cp $R/circuits/cross_task_errors_ablated.{png,json} $D/circuits/
  cp $R/circuits_ieq/{ie_quality.png,ie_quality.svg,ie_correlations.json} $D/circuits/ie_quality/
}

steering() {
  $IC task-vectors --tasks all --threads 1 --quiet --out $R/task_vectors
  mkdir -p $D/task_vectors && cp $R/task_vectors/{best_layers.csv,sweep.csv,sweep.json,layer_sweep.png,layer_sweep.svg} $D/task_vectors/
  $IC detectors --steps sweep --tasks "$T12" --sweep-layers 4-16 --out $R/detectors_sweep --figures $D/heatmaps --threads 1 --quiet
  $IC clean --tasks "$T12" --layer 12 --threads 1 --quiet --out $D/tvc/execution                   # executors, SAE resid_12
  $IC clean --tasks "$T12" --layer 11 --setting detection --threads 1 --quiet --out $D/tvc/detection_l11  # detectors (ITO start)
  $IC heatmap --results $D/tvc/execution --name execution_cleaned --out $R/heatmap/execution --figures $D/heatmaps --threads 1 --quiet
  # negative steering (App. F.1) on each task's top executor: 8 of the paper's 50 scales (same range, relative to the
  # calibrated shared scale) and 4 x 16-shot prompts per task, to fit the CPU budget
  local S SC TOP
  S=$(.venv/bin/python -c "import json; print(json.load(open('$R/heatmap/execution/heatmap.json'))['shared_scale'])")
  SC=$(.venv/bin/python -c "from icl_circuits.steering import paper_negative_scales as p; print(','.join(f'{x:g}' for x in p($S, 8)))")
  TOP=$(.venv/bin/python -c "import csv; print(','.join(sorted({r['top_feature'] for r in csv.DictReader(open('$D/heatmaps/execution_cleaned_specificity.csv')) if r['top_feature'] and float(r['own_effect']) > 0})))")
  $IC heatmap --results $D/tvc/execution --name execution_cleaned --out $R/heatmap/execution --figures $D/heatmaps --threads 1 --quiet \
    --negative --negative-prompts 4 --negative-shots 16 --negative-scales "$SC" --negative-features "$TOP"
  $IC heatmap --results $D/tvc/detection_l11 --top-only --name detection_cleaned_top --out $R/heatmap/detection_top \
    --figures $D/heatmaps --threads 1 --quiet
  $IC detectors --steps masses,link --executors $D/tvc/execution --detectors $D/tvc/detection_l11 \
    --exec-heatmap $R/heatmap/execution/heatmap.json --det-heatmap $R/heatmap/detection_top/heatmap.json \
    --out $R/detectors --figures $D/heatmaps --threads 1 --quiet
  cp $R/detectors/{link.json,masses.json} $D/heatmaps/
}

case "${1:-all}" in
  circuits) circuits ;;
  steering) steering ;;
  all) circuits & steering; wait ;;
  *) echo "usage: $0 [circuits|steering|all]" >&2; exit 2 ;;
esac
