#!/usr/bin/env bash
# The CPU demo: IPRO end to end on real faces, about 12 minutes on 2 quiet cores, fp32.
#   bash demo.sh [OUT]        (default OUT=runs/demo)
# 1. real-face clips from photos shipped inside pip packages (held-out people for evaluation);
# 2. a tiny base image-to-video model trained from scratch with flow matching (the SFT method);
# 3. IPRO on top of it: 8-step Euler rollouts, gradient through the last 4, face reward + KL;
# 4. base vs IPRO on the held-out people, with dlib's recognizer (not the reward's SFace), and on
#    the training people; both sampled as IPRO's rollouts are (Euler, 8 steps, no CFG).
# The tiny model's VAE was fitted once on the training clips (data.py fit-vae) and ships in assets/.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-runs/demo}
VAE=assets/tiny_vae.safetensors
# --overwrite: a re-run of the demo trains again from scratch (train.py refuses an existing run without it).
COMMON="--model tiny --data $OUT/data --vae $VAE --lora-rank 0 --dtype fp32 --save-every 0 --cache-clips --overwrite"

python data.py demo --out "$OUT/data" --clips 4
python train.py $COMMON --method sft --out "$OUT/sft" --steps 2000 --batch 8 --micro-batch 8 --lr 1e-3
python train.py $COMMON --ckpt "$OUT/sft/model.safetensors" --out "$OUT/ipro" --steps 100 --batch 4 --micro-batch 4 \
    --lr 1e-3
python eval.py --data "$OUT/data" --model tiny --solver euler --weights "$OUT/sft/model.safetensors" --vae $VAE \
    --ckpt "$OUT/ipro/model.safetensors" --train-log "$OUT/ipro/train.jsonl" --out "$OUT/eval" > "$OUT/eval.log"
# The same comparison on 16 clips of the people IPRO trained on: the reward at work, before transfer.
python eval.py --data "$OUT/data" --split train --max-clips 16 --model tiny --solver euler --weights "$OUT/sft/model.safetensors" \
    --vae $VAE --ckpt "$OUT/ipro/model.safetensors" --out "$OUT/eval_train" > "$OUT/eval_train.log"
echo "== held-out people ($OUT/eval/index.html) =="
cat "$OUT/eval/table.md"
echo "== people IPRO trained on ($OUT/eval_train/table.md) =="
grep -- "- ipro vs base" "$OUT/eval_train/table.md"
