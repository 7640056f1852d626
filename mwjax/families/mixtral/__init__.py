"""mwjax/families/mixtral"""
