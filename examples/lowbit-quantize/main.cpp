// lowbit-quantize: the command-line tool (see quantize_tool.hpp and docs/cli.md).
#include "quantize_tool.hpp"

int main(int argc, char** argv) { return lowbit::tool::main(argc, argv); }
