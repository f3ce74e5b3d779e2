"""Anycast PoPs: PoP verdicts from node verdicts, driven into a real BGP speaker."""
