"""The downlink: products, their STAC Items, the plan per contact window, the queue and the link.

    scores -> planner (value per byte, one product per tile) -> products -> queue -> link
"""
