"""mwjax/families/llama"""
