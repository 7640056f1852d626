"""mwjax/families/phi3"""
