"""Image + prompt (+ checkpoint) in, mp4 out. Filled by issue #5."""
import argparse

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny", choices=["tiny", "5b", "a14b"])
    args = parser.parse_args()
    raise SystemExit("sample.py is not implemented yet (issue #5)")
