"""Will it fit? The VRAM planner: a spec x a host's GPUs -> sizing and verdict.

``plan.plan_for_spec`` is the entry and ``plan.Plan`` the result; ``render.render_table`` prints
plans side by side. The parts: ``weights``, ``memory``, ``checks``, ``verdict``, ``inputs``,
``shapes`` (offline model shapes) and ``units``.
"""
