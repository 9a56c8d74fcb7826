"""`kn-ray edit`: the knowledge-neuron experiments (suppress, amplify, update, erase).

stage    the command: options, work units in, edits/ parts and summary.json out
corpus   the run's prompts and neurons cut into picklable work units
runner   the experiments on one work unit (a loaded model -> prompt rows)
tables   the edits table: schema, row builders, metric rows, summaries
actors   work units on Ray actors (the only edit module that imports ray)

Nothing is imported here, so reading the edits table (tables) never loads torch.
"""
