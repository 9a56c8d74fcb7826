"""`kn-ray edit`: the knowledge-neuron experiments (suppress, amplify, update, erase).

options  EditOptions and EditSettings, the declared options (the CLI's flags come from them)
stage    the command: work units in, edits/ parts and edits.json out
corpus   the run's prompts and neurons cut into picklable work units
experiments  the experiments on one work unit (a loaded model -> prompt rows)
outcomes the edits table: schema, row builders, metric rows, summaries
criteria the edits judged by today's criteria (EasyEdit), from the prompt rows
actors   work units on Ray actors (the only edit module that imports ray)

Nothing is imported here, so reading the edits table (outcomes) never loads torch.
"""
