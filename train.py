"""IPRO training: reward-feedback fine-tuning of Wan2.2 with truncated backprop and multi-step KL.

Filled by issue #7.
"""
import argparse

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny", choices=["tiny", "5b", "a14b"])
    args = parser.parse_args()
    raise SystemExit("train.py is not implemented yet (issue #7)")
