"""Raw videos -> training clips with ground-truth face pools. Filled by issue #6."""
import argparse

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    args = parser.parse_args()
    raise SystemExit("data.py is not implemented yet (issue #6)")
