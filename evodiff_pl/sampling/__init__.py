"""The sampling flow: seed-indexed generation (`generate`) and `sample.py`'s options, plan, job and outputs (`cli`)."""
