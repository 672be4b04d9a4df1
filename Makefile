# Conveniences for developers; the README's quick start uses scripts/demo and scripts/test, which
# work on a machine that does not have make yet.
.PHONY: build demo test bench clean
build:
	scripts/setup build
	scripts/build
demo:
	scripts/demo
test:
	scripts/test
clean:
	rm -rf build
