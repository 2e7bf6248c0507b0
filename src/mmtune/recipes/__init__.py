"""Recipes: what a command runs, one file each (train, evaluate, instruct, compare, bench, demo,
smoke, ceilings), built on the layers below and imported only by the CLI."""
