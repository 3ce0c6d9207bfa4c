"""``t0s1 quickstart``: the whole s1 loop (data, SFT, budget forcing sweep) on a laptop CPU.

``problems`` generates the task the loop trains and evaluates on: arithmetic chains whose answer
needs every step, so accuracy rises with the thinking budget. ``pipeline`` chains the stages.
"""
