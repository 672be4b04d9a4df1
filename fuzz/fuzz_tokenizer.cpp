// A tokenizer.json; a tokenizer that loads must encode and decode text back to the same bytes.
#include "fuzz/fuzz_target.h"
#include "model/tokenizer.h"

PM_FUZZ_TARGET({
  pm::Tokenizer t = pm::Tokenizer::from_json(input, "fuzz tokenizer.json");
  const std::string text = "The jury said it had found no evidence.\n\x01\xff  ";
  if (t.decode(t.encode(text)) != text) __builtin_trap();
})
