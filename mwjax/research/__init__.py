"""mwjax/research"""
