"""Identity and video-quality metrics over an eval set. Filled by issue #8."""
import argparse

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    args = parser.parse_args()
    raise SystemExit("eval.py is not implemented yet (issue #8)")
