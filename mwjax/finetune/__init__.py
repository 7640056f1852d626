"""mwjax/finetune"""
