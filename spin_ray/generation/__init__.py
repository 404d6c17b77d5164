"""Opponent generation: engines that answer prompts, and the Ray Data pipeline around them."""
