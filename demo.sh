#!/usr/bin/env bash
# The CPU demo: IPRO end to end on real faces, fp32, on 2 cores.
#   bash demo.sh [OUT]              IPRO on the shipped base, evaluated on held-out people (about 11 min)
#   bash demo.sh ablations [OUT]    the paper's ablations in the same world (about 45 min)
#   bash demo.sh sweep [OUT]        the reward/KL balance judged on training clips only (about 25 min, estimated)
#   bash demo.sh base [OUT]         re-train the shipped base model (assets/tiny_base.safetensors)
# 1. data.py demo: clips filmed from photos shipped inside pip packages with a moving camera, plus
#    pseudo-identities made from the training photos only; 3 real people (4 photos, 32 clips) are held out, never seen
#    in any form (not even as part of a pseudo-identity);
# 2. the base: the tiny image-to-video model trained once from scratch with flow matching on that
#    world (`bash demo.sh base`, the SFT method) and shipped in assets/, like its VAE;
# 3. IPRO on top of it: 8-step Euler rollouts, gradient through the last 4, face reward + KL;
# 4. base vs IPRO on the held-out people, with dlib's recognizer (not the reward's SFace), and on
#    training people; both sampled as IPRO's rollouts are (Euler, 8 steps, no CFG); the last lines
#    compare your numbers with the reference run's (assets/demo_reference.json).
set -euo pipefail
cd "$(dirname "$0")"
MODE=demo
if [[ ${1:-} == base || ${1:-} == ablations || ${1:-} == sweep ]]; then MODE=$1; shift; fi
OUT=${1:-runs/demo}
VAE=assets/tiny_vae.safetensors
BASE=assets/tiny_base.safetensors
# --overwrite: a re-run trains again from scratch (train.py refuses an existing run without it).
COMMON="--model tiny --data $OUT/data --vae $VAE --lora-rank 0 --dtype fp32 --save-every 0 --cache-clips --overwrite"
EVAL="--data $OUT/data --model tiny --solver euler --weights $BASE --vae $VAE"
IPRO="--ckpt $BASE --steps 100 --batch 4 --micro-batch 4 --lr 1e-3"

if [[ ! -f $OUT/data/manifest.jsonl ]]; then
    python data.py demo --out "$OUT/data" --clips 4 --eval-clips 8 --pseudo 96
fi

if [[ $MODE == base ]]; then
    python train.py $COMMON --method sft --out "$OUT/base" --steps 8000 --batch 8 --micro-batch 8 --lr 1e-3
    cp "$OUT/base/model.safetensors" "$BASE"
    exit 0
fi

if [[ $MODE == ablations ]]; then
    # Each variant differs from IPRO in one choice (paper Tables 4-6), all from the same base.
    [[ -f $OUT/ipro/model.safetensors ]] || python train.py $COMMON $IPRO --out "$OUT/ipro"   # the demo's run
    python train.py $COMMON $IPRO --out "$OUT/no_kl" --kl-weight 0
    python train.py $COMMON $IPRO --out "$OUT/no_fsm" --score first
    python train.py $COMMON $IPRO --out "$OUT/high_window" --grad-window high
    python train.py $COMMON --ckpt $BASE --method sft --sft-face-weight 0.1 --out "$OUT/sft_face" --steps 100 \
        --batch 4 --micro-batch 4 --lr 1e-3
    CKPTS=""
    LOGS=""
    for run in ipro no_kl no_fsm high_window sft_face; do
        CKPTS="$CKPTS --ckpt $OUT/$run/model.safetensors"
        LOGS="$LOGS --train-log $OUT/$run/train.jsonl"
    done
    python eval.py $EVAL $CKPTS $LOGS --out "$OUT/ablations_eval" > "$OUT/ablations_eval.log"
    python eval.py $EVAL --split train --max-clips 16 $CKPTS --out "$OUT/ablations_eval_train" \
        > "$OUT/ablations_eval_train.log"
    echo "== held-out people ($OUT/ablations_eval/table.md) =="
    cat "$OUT/ablations_eval/table.md"
    echo "== training people ($OUT/ablations_eval_train/table.md) =="
    grep -- " vs base" "$OUT/ablations_eval_train/table.md"
    exit 0
fi

if [[ $MODE == sweep ]]; then
    # Weaker KL against the reward, scored on 16 training clips only (never on held-out people):
    # the paper's weights, the authors' code's normalisation (6.25x the reward), KL 0.04, no KL.
    [[ -f $OUT/ipro/model.safetensors ]] || python train.py $COMMON $IPRO --out "$OUT/ipro"
    [[ -f $OUT/no_kl/model.safetensors ]] || python train.py $COMMON $IPRO --out "$OUT/no_kl" --kl-weight 0
    python train.py $COMMON $IPRO --out "$OUT/roll_norm" --reward-center 0.54 --reward-scale 0.16
    python train.py $COMMON $IPRO --out "$OUT/kl004" --kl-weight 0.04
    ARGS=""
    for run in ipro roll_norm kl004 no_kl; do
        ARGS="$ARGS --ckpt $OUT/$run/model.safetensors --train-log $OUT/$run/train.jsonl"
    done
    python eval.py $EVAL --split train --max-clips 16 $ARGS --out "$OUT/sweep_eval_train" > "$OUT/sweep_eval_train.log"
    echo "== training people only ($OUT/sweep_eval_train/table.md) =="
    cat "$OUT/sweep_eval_train/table.md"
    exit 0
fi

REF=assets/demo_reference.json
python train.py $COMMON $IPRO --out "$OUT/ipro"
python eval.py $EVAL --ckpt "$OUT/ipro/model.safetensors" --train-log "$OUT/ipro/train.jsonl" --out "$OUT/eval" \
    --reference $REF > "$OUT/eval.log"
# The same comparison on 16 clips of the people IPRO trained on: the reward at work, before transfer.
python eval.py $EVAL --split train --max-clips 16 --ckpt "$OUT/ipro/model.safetensors" --out "$OUT/eval_train" \
    --reference $REF > "$OUT/eval_train.log"
echo "== held-out people ($OUT/eval/index.html) =="
cat "$OUT/eval/table.md"
echo "== people IPRO trained on ($OUT/eval_train/table.md) =="
grep -- " vs base" "$OUT/eval_train/table.md"
echo "== your run vs the reference run (assets/demo_reference.json) =="
grep -h "^reproduced" "$OUT/eval.log" "$OUT/eval_train.log"
