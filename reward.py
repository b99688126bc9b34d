"""Differentiable face-identity reward with the facial scoring mechanism. Filled by issue #4."""
import argparse

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    args = parser.parse_args()
    raise SystemExit("reward.py is not implemented yet (issue #4)")
