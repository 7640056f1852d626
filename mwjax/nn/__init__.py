"""mwjax/nn"""
