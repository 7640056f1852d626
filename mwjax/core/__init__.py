"""mwjax/core"""
