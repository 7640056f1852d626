"""mwjax/families/gemma"""
