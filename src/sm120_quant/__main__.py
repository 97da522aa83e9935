from sm120_quant.cli.quantize_cmd import main

main()
