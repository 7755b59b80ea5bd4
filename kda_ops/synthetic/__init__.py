"""Synthetic tasks that show a KDA model trains (the Kimi Linear report's Palindrome, MQAR and
Stack), the small models trained on them, and the training loop. Experiments drive them from
bench/synthetic/train.py."""
