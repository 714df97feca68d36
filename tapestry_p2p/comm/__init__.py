"""Communication of one round: averaging, the bit-exact all-reduce, matchmaking and the meeting clock, codecs, state
sync. Moves lists of tensors; knows nothing about the model."""
